"""The frontend's link to engine-core: spawning it (or finding a daemon), the two DEALER
sockets, the handshake, and what the link says about the engine's health.

A spawned engine-core is our child: its exit is the engine's death (its last `EngineDead`,
read first, names the cause). A daemon is watched through its sockets. A socket monitor
tells *gone* from *slow*: a closed connection (the daemon process died or closed it) or a
refused one (nothing listens) is known at once; a daemon that is merely slow or stopped
keeps answering ZMTP heartbeats from ZeroMQ's own I/O thread, or falls silent, and only
`heartbeat_timeout` of silence closes the connection. After a loss the client opens fresh
sockets (a new identity, a new `Hello`) and waits for a daemon to answer again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import msgspec
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from zllm.frontend.errors import EngineStartupError
from zllm.protocol.config import EngineArgs
from zllm.protocol.messages import (
    PROTOCOL_VERSION,
    Hello,
    Ready,
    StartupFailed,
    decode_core_message,
    encode,
)
from zllm.protocol.process import (
    core_addresses,
    describe_exit,
    listener_error,
    private_ipc_address,
    remove_socket_file,
    spawn_env,
)

logger = logging.getLogger("zllm.frontend")

POLL_MS = 100
# How long a client waits for engine-core's Ready: loading a large model takes minutes.
STARTUP_TIMEOUT_S = float(os.environ.get("ZLLM_STARTUP_TIMEOUT", "900"))
STARTUP_LOG_EVERY_S = 30.0
CONNECT_GRACE_S = 10.0  # how long a daemon's socket may take to appear
FRAMES_PER_POLL = 64  # a step's outputs each: ~0.1 s of a busy client's work
HEARTBEAT_IVL_MS = 1000  # ZMTP pings to a daemon; `heartbeat_timeout` of silence ends the link
HANDSHAKE_ATTEMPTS = 5  # failed security handshakes in a row: not a daemon that is stopping

_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


@dataclass
class LinkEvent:
    # "lost": an established connection closed (what was in flight is gone); "absent":
    # nothing accepts connections at the address; "cut": the peer closed the connection
    # during the handshake; "rejected": the security handshake failed for certain.
    kind: str
    error: str


class CoreConnection:
    def __init__(self, engine_args: EngineArgs) -> None:
        """Spawn engine-core (or find the daemon), connect both sockets and say hello."""
        self.engine_args = engine_args
        self.address = engine_args.engine_core_address
        self.proc: subprocess.Popen | None = None
        self.ipc_dir: str | None = None  # a spawned core's private socket directory
        self.ctx = zmq.Context()
        self.input: zmq.Socket | None = None
        self.output: zmq.Socket | None = None
        self.identity = b""
        self.last_sent = 0.0  # monotonic time of the last frame sent
        self._monitors: list[zmq.Socket] = []
        self._connected = False  # a handshake succeeded on the current sockets
        self._poller: zmq.Poller | None = None
        self._poller_wake: object = None
        self._curve: tuple[bytes, bytes, bytes] | None = None  # public, secret, server's
        self._closed = False
        try:
            if self.address:
                self.input_address, self.output_address = core_addresses(self.address)
                self._curve = _client_keys(engine_args)
                self._wait_for_listener()
            else:
                self.input_address, self.ipc_dir = private_ipc_address("core-input")
                self.output_address = f"ipc://{self.ipc_dir}/core-output.sock"
                self._spawn_core()
            self.open()
        except BaseException:
            self.close(kill=True)
            raise

    @property
    def is_daemon(self) -> bool:
        return self.proc is None

    def _spawn_core(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zllm.core.main",
                "--input",
                self.input_address,
                "--output",
                self.output_address,
            ],
            stdin=subprocess.PIPE,
            env=spawn_env(),
        )
        self.proc.stdin.write(msgspec.json.encode(self.engine_args))
        self.proc.stdin.close()

    def _wait_for_listener(self) -> None:
        """Fail fast when no daemon listens at the address (after a short grace, for a daemon
        started at the same moment): ZeroMQ itself would wait silently forever."""
        deadline = time.monotonic() + CONNECT_GRACE_S
        while (absent := listener_error(self.output_address)) is not None:
            if time.monotonic() > deadline:
                raise EngineStartupError(
                    f"no engine-core is listening at {self.address}: {absent} after "
                    f"{CONNECT_GRACE_S:.0f} s (start one with `zllm engine-core --address {self.address}`)"
                )
            time.sleep(0.1)

    # ---- sockets -------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect fresh sockets and say Hello. A new identity each time: a daemon that lost
        sight of us aborted what the old one had running, and must not mix the two up."""
        self.close_sockets()
        self.identity = uuid.uuid4().bytes
        self._connected = False
        self.input = self._socket(self.input_address)
        self.output = self._socket(self.output_address, unlimited_receive=True)
        self.output.send(
            encode(Hello(protocol_version=PROTOCOL_VERSION, client_name=f"pid-{os.getpid()}"))
        )
        self._poller = None

    def _socket(self, address: str, unlimited_receive: bool = False) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        if unlimited_receive:
            # The outputs: ZeroMQ's I/O thread takes every frame engine-core sends as it
            # comes, so the backlog of a client that processes slower than the engine steps
            # waits here, in the client's own memory, not in a daemon shared with others
            # (which queues without limit too, never dropping: `ClientSockets.listen`).
            # Set before connect: the connection's pipe takes the value then.
            sock.setsockopt(zmq.RCVHWM, 0)
        if self.is_daemon:
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.engine_args.heartbeat_timeout * 1000))
            if self._curve is not None:
                sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self._curve
            self._monitors.append(sock.get_monitor_socket(_EVENTS))  # before connect: all events
        sock.connect(address)
        return sock

    def close_sockets(self) -> None:
        for sock in (self.input, self.output):
            if sock is not None and not sock.closed:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                sock.close(0)
        for monitor in self._monitors:
            monitor.close(0)
        self._monitors = []
        self.input = self.output = None

    # ---- the handshake (the caller's thread) ---------------------------------------------------

    def describe(self) -> str:
        if self.is_daemon:
            return f"the engine-core daemon at {self.address}"
        return f"engine-core (pid {self.proc.pid}) to load {self.engine_args.model}"

    def handshake(self) -> Ready:
        """Wait for Ready; raise the core's own start-up error, a refused key, or a time-out
        naming the setting."""
        start = time.monotonic()
        deadline, next_log = start + STARTUP_TIMEOUT_S, start + STARTUP_LOG_EVERY_S
        failed_handshakes = 0
        while time.monotonic() < deadline:
            events = self.poll(POLL_MS)
            for frame in self.received(events):
                message = decode_core_message(frame)
                if isinstance(message, Ready):
                    return message
                if isinstance(message, StartupFailed):
                    raise EngineStartupError(f"engine failed to start: {message.error}")
            for event in self.link_events(events):
                if event.kind == "lost":  # the daemon went away while loading: it may come back
                    self.open()
                elif event.kind == "rejected":
                    raise EngineStartupError(event.error)
                elif event.kind == "cut":
                    failed_handshakes += 1
                    if failed_handshakes >= HANDSHAKE_ATTEMPTS:
                        raise EngineStartupError(event.error)
            if self.proc is not None and self.proc.poll() is not None:
                raise EngineStartupError(
                    f"engine-core {describe_exit(self.proc.pid, self.proc.returncode)} before it was ready (see its log above)"
                )
            if time.monotonic() > next_log:
                next_log += STARTUP_LOG_EVERY_S
                logger.warning(
                    "still waiting for %s (%.0f s so far; ZLLM_STARTUP_TIMEOUT=%.0f s)",
                    self.describe(),
                    time.monotonic() - start,
                    STARTUP_TIMEOUT_S,
                )
        raise EngineStartupError(
            f"gave up waiting for {self.describe()}: no Ready within {STARTUP_TIMEOUT_S:.0f} s "
            "(ZLLM_STARTUP_TIMEOUT sets how long to wait)"
        )

    # ---- traffic ---------------------------------------------------------------------------------

    def poll(self, timeout_ms: int, wake: object = None) -> dict:
        """Wait for a frame, a link event, or `wake` (a socket the client writes to)."""
        if self._poller is None or self._poller_wake is not wake:
            self._poller, self._poller_wake = zmq.Poller(), wake
            for sock in (self.output, *self._monitors):
                self._poller.register(sock, zmq.POLLIN)
            if wake is not None:
                self._poller.register(wake, zmq.POLLIN)
        return dict(self._poller.poll(timeout_ms))

    def send(self, frame: bytes) -> None:
        self.input.send(frame)
        self.last_sent = time.monotonic()

    def received(self, events: dict) -> list[bytes]:
        """The frames waiting on the output socket, at most `FRAMES_PER_POLL`: a client far
        behind the engine goes back to its loop between batches of them, where it sends its
        requests and heartbeats (a daemon forgets a client silent for `--client-timeout`)."""
        frames = []
        if self.output in events:
            while len(frames) < FRAMES_PER_POLL and self.output.poll(0):
                frames.append(self.output.recv())
        return frames

    def link_events(self, events: dict) -> list[LinkEvent]:
        """What the daemon link's monitors reported: a lost connection (then nothing more), a
        refused one, or a failed security handshake."""
        out = []
        for monitor in self._monitors:
            if monitor not in events:
                continue
            while monitor.poll(0):
                kind = recv_monitor_message(monitor)["event"]
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._connected = True
                elif kind == zmq.EVENT_DISCONNECTED and self._connected:
                    # What follows (ZeroMQ retrying this connection) concerns sockets the
                    # client now replaces: not a daemon refusing new ones.
                    self._connected = False
                    error = f"lost the connection to engine-core at {self.address}"
                    return [*out, LinkEvent("lost", error)]
                elif kind == zmq.EVENT_CONNECT_RETRIED:
                    error = f"no engine-core is listening at {self.address} (connection refused)"
                    out.append(LinkEvent("absent", error))
                elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    # A daemon dying as we connect, a Curve daemon that cannot read our
                    # hello (no key, a wrong curve_server_key): one event. Repetition tells.
                    out.append(LinkEvent("cut", self._handshake_error(kind)))
                elif kind != zmq.EVENT_DISCONNECTED:
                    out.append(LinkEvent("rejected", self._handshake_error(kind)))
        return out

    def _handshake_error(self, kind: int) -> str:
        where = f"engine-core at {self.address}"
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            why = (
                "does it require CurveZMQ (give curve_secret_key and curve_server_key)?"
                if self._curve is None
                else "is curve_server_key its public key, and does it use CurveZMQ?"
            )
            return f"{where} closed the connection during the handshake: {why} (or is it stopping?)"
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            public = self._curve[0].decode() if self._curve else "(none)"
            return (
                f"{where} refused this client's CurveZMQ key {public}: it is not among the "
                "daemon's allowed keys (--curve-clients, --curve-admins)"
            )
        if self._curve is None:
            return (
                f"the security handshake with {where} failed: does it require CurveZMQ (give "
                "curve_secret_key and curve_server_key)?"
            )
        return f"the CurveZMQ handshake with {where} failed: the daemon does not use CurveZMQ"

    def core_exited(self) -> str | None:
        """A spawned core's end, in words, once it exited."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"engine-core {describe_exit(self.proc.pid, self.proc.returncode)}"
        return None

    def last_words(self) -> list[bytes]:
        """What a spawned core sent as it died (its `EngineDead` names the cause)."""
        frames = []
        while self.output.poll(50):
            frames.append(self.output.recv())
        return frames

    # ---- the end -------------------------------------------------------------------------------

    def close(self, kill: bool) -> None:
        """Stop a spawned core (SIGTERM, or SIGKILL when `kill`), close the sockets and remove
        the socket files a killed core could not. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close_sockets()
        self.ctx.term()
        if self.proc is not None:
            remove_socket_file(self.input_address)
            remove_socket_file(self.output_address)


def _client_keys(engine_args: EngineArgs) -> tuple[bytes, bytes, bytes] | None:
    """(public, secret, server's public) from the key files, or None without Curve."""
    if engine_args.curve_secret_key is None:
        return None
    try:
        public, secret = zmq.auth.load_certificate(os.path.expanduser(engine_args.curve_secret_key))
        server, _ = zmq.auth.load_certificate(os.path.expanduser(engine_args.curve_server_key))
    except (OSError, ValueError) as e:
        raise ValueError(f"curve_secret_key / curve_server_key: {e}") from None
    if secret is None:
        raise ValueError(
            f"curve_secret_key: {engine_args.curve_secret_key} holds no secret key "
            "(use the .key_secret file `zllm keys generate` wrote)"
        )
    return public, secret, server
