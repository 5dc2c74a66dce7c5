"""The frontend's link to engine-core: spawning it (or finding a daemon), the two DEALER
sockets, the handshake, and how the client learns that the engine is gone.

A spawned engine-core is our child: its exit is the engine's death (its last `EngineDead`,
read first, names the cause). A daemon is watched through its sockets: a socket monitor
reports a closed connection at once (the daemon process died, or closed it), and ZMTP
heartbeats close a connection whose peer stays silent (`HEARTBEAT_TIMEOUT_MS`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid

import msgspec
import zmq
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
# Daemon connections: ZMTP heartbeats turn a silent peer into a disconnect within this time.
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500


class CoreConnection:
    def __init__(self, engine_args: EngineArgs) -> None:
        """Spawn engine-core (or find the daemon), connect both sockets and say hello."""
        self.engine_args = engine_args
        self.identity = uuid.uuid4().bytes
        self.proc: subprocess.Popen | None = None
        self.ipc_dir: str | None = None  # a spawned core's private socket directory
        self.ctx = zmq.Context()
        self.input: zmq.Socket | None = None
        self.output: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._closed = False
        try:
            if engine_args.engine_core_address:
                self.input_address, self.output_address = core_addresses(
                    engine_args.engine_core_address
                )
                self._wait_for_listener()
            else:
                self.input_address, self.ipc_dir = private_ipc_address("core-input")
                self.output_address = f"ipc://{self.ipc_dir}/core-output.sock"
                self._spawn_core()
            self.input = self._socket(self.input_address)
            self.output = self._socket(self.output_address)
            self.output.send(
                encode(Hello(protocol_version=PROTOCOL_VERSION, client_name=f"pid-{os.getpid()}"))
            )
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
                address = self.engine_args.engine_core_address
                raise EngineStartupError(
                    f"no engine-core is listening at {address}: {absent} after "
                    f"{CONNECT_GRACE_S:.0f} s (start one with `zllm engine-core --address {address}`)"
                )
            time.sleep(0.1)

    def _socket(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        if self.is_daemon:  # notice a silent peer, not only a closed one
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.connect(address)
        return sock

    # ---- the handshake (the caller's thread) ---------------------------------------------------

    def describe(self) -> str:
        if self.is_daemon:
            return f"the engine-core daemon at {self.engine_args.engine_core_address}"
        return f"engine-core (pid {self.proc.pid}) to load {self.engine_args.model}"

    def handshake(self) -> Ready:
        """Wait for Ready; raise the core's own start-up error, or a time-out naming the setting."""
        start = time.monotonic()
        deadline, next_log = start + STARTUP_TIMEOUT_S, start + STARTUP_LOG_EVERY_S
        while time.monotonic() < deadline:
            if self.output.poll(POLL_MS):
                message = decode_core_message(self.output.recv())
                if isinstance(message, Ready):
                    return message
                if isinstance(message, StartupFailed):
                    raise EngineStartupError(f"engine failed to start: {message.error}")
                continue
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

    # ---- the I/O thread --------------------------------------------------------------------------

    def watch(self, poller: zmq.Poller) -> None:
        """Register what the I/O thread waits on (from the I/O thread: sockets move there)."""
        if self.is_daemon:
            self._monitor = self.output.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            poller.register(self._monitor, zmq.POLLIN)
        poller.register(self.output, zmq.POLLIN)

    def send(self, frame: bytes) -> None:
        self.input.send(frame)

    def received(self, events: dict) -> list[bytes]:
        """Every frame waiting on the output socket."""
        frames = []
        if self.output in events:
            while self.output.poll(0):
                frames.append(self.output.recv())
        return frames

    def engine_gone(self, events: dict) -> str | None:
        """Why the engine can no longer answer, or None while it can."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"engine-core {describe_exit(self.proc.pid, self.proc.returncode)}"
        if self._monitor is not None and self._monitor in events:
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                return f"lost the connection to engine-core at {self.output_address}"
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
        if self._monitor is not None:
            try:
                self.output.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)
            self._monitor = None
        for sock in (self.input, self.output):
            if sock is not None and not sock.closed:
                sock.close(0)
        self.ctx.term()
        if self.proc is not None:
            remove_socket_file(self.input_address)
            remove_socket_file(self.output_address)
