"""The frontend's connection to engine-core: spawns it (or connects to a daemon), and runs a
private I/O thread that owns both sockets.

Callers from any thread or event loop hand requests to the I/O thread through a queue;
the I/O thread turns engine outputs into `RequestOutput`s and puts them into each
request's `RequestStream`. If the engine dies, every stream and every pending call gets
`EngineDeadError` at once.

Each request gets an engine-side id (the caller's id plus a random suffix, as vLLM does), so
a caller may reuse an id the moment its request is aborted without ever receiving the old
request's late tokens. A request with `n > 1` is n engine requests sharing one stream
(`parallel_sampling.fan_out`).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from zllm.frontend.errors import EngineDeadError, EngineOverloadedError, EngineStartupError
from zllm.frontend.input_processor import ProcessedRequest
from zllm.frontend.output_processor import finish_aborted
from zllm.frontend.parallel_sampling import fan_out
from zllm.frontend.pooling_state import PoolingRequestState
from zllm.frontend.stream import ConsumerGone, RequestStream
from zllm.protocol.config import EngineArgs
from zllm.protocol.messages import (
    PROTOCOL_VERSION,
    AbortRequests,
    AddRequest,
    EncodedAddRequests,
    EngineDead,
    FrameRejected,
    Goodbye,
    Hello,
    Ready,
    RequestUpdate,
    StartupFailed,
    StepOutputs,
    UtilityCall,
    UtilityReply,
    decode_core_message,
    encode,
)
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.process import (
    core_addresses,
    describe_exit,
    listener_error,
    private_ipc_address,
    remove_socket_file,
    spawn_env,
)
from zllm.protocol.sampling_params import SamplingParams

logger = logging.getLogger("zllm.frontend")

POLL_MS = 100
# How long a client waits for engine-core's Ready: loading a large model takes minutes.
STARTUP_TIMEOUT_S = float(os.environ.get("ZLLM_STARTUP_TIMEOUT", "900"))
STARTUP_LOG_EVERY_S = 30.0
CONNECT_GRACE_S = 10.0  # how long a daemon's socket may take to appear
# Daemon connections: ZMTP heartbeats turn a silent peer into a disconnect within this time.
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500


_PARAMS_FIELD = {SamplingParams: "sampling_params", PoolingParams: "pooling_params"}


@dataclass
class _Live:
    """One request the engine is running for us."""

    request_id: str  # the caller's
    engine_id: str  # the engine's: the (child's) id plus a suffix
    state: Any  # a `RequestState`, or a `ChildHandle` for one of n > 1 samples
    stream: RequestStream  # shared by the n children of a request


class EngineClient:
    def __init__(self, engine_args: EngineArgs, tokenizer=None, *, wait: bool = True) -> None:
        """Spawn engine-core (or connect to a daemon) and say hello.

        With `wait=False` the caller does other start-up work (loading the tokenizer) while the
        core starts, then calls `wait_ready()`.
        """
        self.engine_args = engine_args
        self.tokenizer = tokenizer
        self.identity = uuid.uuid4().bytes
        self.proc: subprocess.Popen | None = None
        self.ctx = zmq.Context()
        self.requests: dict[str, _Live] = {}  # by engine id
        self.by_request_id: dict[str, list[str]] = {}  # caller's id -> engine ids (n of them)
        self.lock = threading.Lock()
        self.outgoing: queue.Queue[msgspec.Struct] = queue.Queue()
        self._abandoned: collections.deque[str] = collections.deque()  # see `abort_soon`
        self.calls: dict[int, concurrent.futures.Future] = {}
        self.call_ids = itertools.count()
        self.dead_error: EngineDeadError | None = None
        self.ready: Ready | None = None
        self.io_thread: threading.Thread | None = None
        self._closed = False
        self._held = 0  # > 0 inside `holding()`
        self._shutdown_requested = False
        self._shutdown_started = False
        self._shutdown_thread: threading.Thread | None = None
        self._shutdown_done = threading.Event()
        self._resources_closed = False
        self._monitor: zmq.Socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

        try:
            if engine_args.engine_core_address:
                self.input_address, self.output_address = core_addresses(
                    engine_args.engine_core_address
                )
                self._wait_for_listener()
            else:
                self.input_address, self._ipc_dir = private_ipc_address("core-input")
                self.output_address = f"ipc://{self._ipc_dir}/core-output.sock"
                self._spawn_core()
            self.input = self._socket(self.input_address)
            self.output = self._socket(self.output_address)
            self.output.send(
                encode(Hello(protocol_version=PROTOCOL_VERSION, client_name=f"pid-{os.getpid()}"))
            )
            if wait:
                self.wait_ready()
        except BaseException:
            self._close_resources(kill=True)
            raise

    # ---- start-up --------------------------------------------------------------------------

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
        if self.proc is None:  # a daemon: notice a silent peer, not only a closed one
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.connect(address)
        return sock

    def wait_ready(self) -> Ready:
        """Finish the handshake and start the I/O thread; raise the core's own start-up error."""
        if self.ready is not None:
            return self.ready
        try:
            self.ready = self._handshake()
        except BaseException:
            self._close_resources(kill=True)
            raise
        if self.proc is None:
            self._monitor = self.output.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.io_thread = threading.Thread(target=self._io_loop, name="zllm-client-io", daemon=True)
        self.io_thread.start()
        _live_clients.add(self)
        return self.ready

    def _handshake(self) -> Ready:
        start = time.monotonic()
        deadline, next_log = start + STARTUP_TIMEOUT_S, start + STARTUP_LOG_EVERY_S
        what = (
            f"the engine-core daemon at {self.engine_args.engine_core_address}"
            if self.proc is None
            else f"engine-core (pid {self.proc.pid}) to load {self.engine_args.model}"
        )
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
                    what,
                    time.monotonic() - start,
                    STARTUP_TIMEOUT_S,
                )
        raise EngineStartupError(
            f"gave up waiting for {what}: no Ready within {STARTUP_TIMEOUT_S:.0f} s "
            "(ZLLM_STARTUP_TIMEOUT sets how long to wait)"
        )

    # ---- requests (any thread) ---------------------------------------------------------------

    def add_request(
        self, request: ProcessedRequest, stream: RequestStream | None = None
    ) -> RequestStream:
        """Start a checked request (n > 1: its n children; a pooling request: one); its outputs
        or its error arrive in the stream (a new one, or `stream`, which `LLMEngine` shares
        between its requests). The frames are encoded here, in the caller's thread: the I/O
        thread only forwards bytes, so no request can break it."""
        request_id, params = request.request_id, request.params
        if isinstance(params, PoolingParams):
            children = [
                (request_id, params, PoolingRequestState(request_id, request.prompt_token_ids))
            ]
        else:
            _, children = fan_out(
                request_id, request.prompt, request.prompt_token_ids, params, self.tokenizer
            )
        stream = RequestStream() if stream is None else stream
        suffix = uuid.uuid4().hex[:8]
        lives = [_Live(request_id, f"{cid}-{suffix}", state, stream) for cid, _, state in children]
        frames = [
            msgspec.Raw(
                encode(
                    AddRequest(
                        request_id=live.engine_id,
                        prompt_token_ids=request.prompt_token_ids,
                        arrival_time=state.metrics.arrival_time,
                        priority=request.priority,
                        **{_PARAMS_FIELD[type(child_params)]: child_params},
                    )
                )
            )
            for live, (_, child_params, state) in zip(lives, children)
        ]
        with self.lock:  # checked under the lock: `_die` cannot slip in between
            self._check_alive_locked()
            if request_id in self.by_request_id:
                raise ValueError(
                    f"request id {request_id!r} is already in use by a running request"
                )
            self.by_request_id[request_id] = [live.engine_id for live in lives]
            for live in lives:
                self.requests[live.engine_id] = live
        for frame in frames:
            self._enqueue(frame)
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests in the engine; each stream gets a last output with finish_reason "abort"."""
        with self.lock:
            lives = [live for rid in request_ids for live in self._forget_request(rid)]
            finish_aborted([(live.state, live.stream) for live in lives])
        if lives and self.dead_error is None and not self._closed:
            self._enqueue(AbortRequests(request_ids=[live.engine_id for live in lives]))

    def abort_soon(self, request_id: str) -> None:
        """`abort` from a finalizer: never takes a lock (the GC may run while it is held);
        the I/O thread does the abort."""
        self._abandoned.append(request_id)
        self._wake()

    def call(self, method: str, *args: Any) -> concurrent.futures.Future:
        """Run a utility method in engine-core; the future resolves from the I/O thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self.call_ids)
        with self.lock:
            try:
                self._check_alive_locked()
            except EngineDeadError as e:
                future.set_exception(e)
                return future
            self.calls[call_id] = future
        self._enqueue(UtilityCall(call_id=call_id, method=method, args=list(args)))
        return future

    def check_alive(self) -> None:
        with self.lock:
            self._check_alive_locked()

    def _check_alive_locked(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(str(self.dead_error))
        if self._closed:
            raise EngineDeadError("the engine was shut down")

    def shutdown_soon(self) -> None:
        """`shutdown` from a finalizer: the GC may run it on any thread, even the I/O thread
        while it holds the lock, so the I/O thread does the shutdown."""
        if self.io_thread is not None and self.io_thread.is_alive():
            self._shutdown_requested = True
            self._wake()
        else:
            self.shutdown()

    def _enqueue(self, message: msgspec.Struct) -> None:
        self.outgoing.put(message)
        self._wake()

    def _wake(self) -> None:
        if self._held:
            return
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or closing

    # ---- the I/O thread ------------------------------------------------------------------------

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.output, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while not self._closed:
            try:
                events = dict(poller.poll(POLL_MS))
                if self._wake_r.fileno() in events:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                if self._shutdown_requested:
                    self.shutdown()
                    return
                while self._abandoned:
                    self.abort([self._abandoned.popleft()])
                self._flush_outgoing()
                if self.output in events:
                    while self.output.poll(0):
                        self._on_frame(self.output.recv())
                if self._closed:
                    return
                if self.proc is not None and self.proc.poll() is not None:
                    while self.output.poll(50):  # its last words (EngineDead with the cause)
                        self._on_frame(self.output.recv())
                    self._die(f"engine-core {describe_exit(self.proc.pid, self.proc.returncode)}")
                    return
                if self._monitor is not None and self._monitor in events:
                    event = recv_monitor_message(self._monitor)
                    if event["event"] == zmq.EVENT_DISCONNECTED:
                        self._die(f"lost the connection to engine-core at {self.output_address}")
                        return
            except Exception as e:  # never leave callers waiting on a broken I/O thread
                logger.exception("client I/O thread failed")
                self._die(f"client I/O thread failed: {type(e).__name__}: {e}")
                return

    def _flush_outgoing(self) -> None:
        """Send what callers queued, in order; adjacent adds (already encoded by the threads
        that submitted them) travel as one `AddRequests`."""
        adds: list[msgspec.Raw] = []
        while True:
            try:
                message = self.outgoing.get_nowait()
            except queue.Empty:
                message = None
            if isinstance(message, msgspec.Raw):
                adds.append(message)
                continue
            if adds:
                frame = adds[0] if len(adds) == 1 else encode(EncodedAddRequests(requests=adds))
                self.input.send(frame)
                adds = []
            if message is None:
                return
            self.input.send(encode(message))

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Queue requests without waking the I/O thread, then send them together."""
        with self.lock:
            self._held += 1
        try:
            yield
        finally:
            with self.lock:
                self._held -= 1
            self._wake()

    def _on_frame(self, frame: bytes) -> None:
        try:
            message = decode_core_message(frame)
        except msgspec.MsgspecError as e:
            logger.warning("dropping an undecodable frame from engine-core: %s", e)
            return
        if isinstance(message, StepOutputs):
            self._on_outputs(message)
        elif isinstance(message, UtilityReply):
            with self.lock:
                future = self.calls.pop(message.call_id, None)
            if future is not None and not future.done():
                if message.error is not None:
                    future.set_exception(RuntimeError(message.error))
                else:
                    future.set_result(message.result)
        elif isinstance(message, FrameRejected):
            logger.error("engine-core could not read a frame from this client: %s", message.error)
        elif isinstance(message, EngineDead):
            self._die(message.error)

    def _on_outputs(self, message: StepOutputs) -> None:
        to_abort: list[str] = []
        now = message.timestamp or time.time()
        with self.lock:  # `abort` from another thread must not interleave with an update
            for update in message.updates:
                live = self.requests.get(update.request_id)
                if live is not None:  # else: aborted meanwhile
                    to_abort += self._deliver(live, update, now)
        if to_abort:
            self.input.send(encode(AbortRequests(request_ids=to_abort)))

    def _deliver(self, live: _Live, update: RequestUpdate, now: float) -> list[str]:
        """Fold an update into its request and hand the output on; return engine ids to abort."""
        if update.error is not None:  # refused by the engine: the whole request fails
            siblings = self._forget_request(live.request_id)
            error_type = EngineOverloadedError if update.error_kind == "overloaded" else ValueError
            live.stream.put_final(error_type(update.error))
            return [other.engine_id for other in siblings if other is not live]
        try:
            stopped_by_string = live.state.apply(update, now)
            # A prompt-logprobs chunk alone (no token yet) shows nothing new to the caller.
            moved = bool(update.new_token_ids) or live.state.finished
            output = live.state.output() if moved else None
        except Exception as e:  # one request's failure (detokenizing) ends that request only
            logger.exception("could not process output of request %s", live.request_id)
            live.stream.put_final(e)
            return [other.engine_id for other in self._forget_request(live.request_id)]
        if live.state.finished:
            self._forget(live)
        if output is not None:
            try:
                live.stream.put(output)
            except ConsumerGone:  # its loop is closed: nobody will read it, stop it
                gone = self._forget_request(live.request_id)
                return [other.engine_id for other in gone if not other.state.finished]
        return [live.engine_id] if stopped_by_string else []

    def _forget(self, live: _Live) -> None:
        """Drop one engine request's bookkeeping (caller holds the lock)."""
        self.requests.pop(live.engine_id, None)
        siblings = self.by_request_id.get(live.request_id)
        if siblings is not None and live.engine_id in siblings:
            siblings.remove(live.engine_id)
            if not siblings:
                del self.by_request_id[live.request_id]

    def _forget_request(self, request_id: str) -> list[_Live]:
        """Drop every engine request of a user request (caller holds the lock); return them."""
        engine_ids = self.by_request_id.pop(request_id, [])
        return [live for eid in engine_ids if (live := self.requests.pop(eid, None)) is not None]

    def _die(self, cause: str, prefix: str = "the engine died: ") -> None:
        message = prefix + cause
        with self.lock:
            if self.dead_error is not None:
                return
            self.dead_error = EngineDeadError(message)
            entries = list(self.requests.values())
            self.requests.clear()
            self.by_request_id.clear()
            calls = list(self.calls.values())
            self.calls.clear()
        if prefix:
            logger.error("%s", message)
        for live in entries:
            live.stream.put_final(EngineDeadError(message))  # one instance each: own traceback
        for future in calls:
            if not future.done():
                future.set_exception(EngineDeadError(message))

    # ---- shutdown ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the engine this client started (or leave a daemon's), release everything.

        Idempotent; a call that finds another thread shutting down waits until it is done, so
        when any `shutdown()` returns (at exit, say) the engine's processes are gone.
        """
        with self.lock:
            first = not self._shutdown_started
            self._shutdown_started = self._closed = True
            if first:
                self._shutdown_thread = threading.current_thread()
        if not first:
            if threading.current_thread() is not self._shutdown_thread:
                self._shutdown_done.wait(timeout=30)
            return
        try:
            self._shutdown()
        finally:
            self._shutdown_done.set()

    def _shutdown(self) -> None:
        thread = self.io_thread
        if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
            thread.join(timeout=2)
        if self.dead_error is None and self.proc is None and self.ready is not None:
            try:  # a daemon: tell it to drop our requests
                self.input.send(encode(Goodbye()))
            except zmq.ZMQError:
                pass
        self._close_resources(kill=False)
        self._die("the engine was shut down", prefix="")
        _live_clients.discard(self)

    def _close_resources(self, kill: bool) -> None:
        self._closed = True
        if self._resources_closed:
            return
        self._resources_closed = True
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
        for name in ("input", "output"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close(0)
        self.ctx.term()
        self._wake_r.close()
        self._wake_w.close()
        if self.proc is not None:
            remove_socket_file(self.input_address)
            remove_socket_file(self.output_address)


_live_clients: weakref.WeakSet[EngineClient] = weakref.WeakSet()


def wait_for_dropped_clients(timeout_s: float = 30.0) -> None:
    """Wait until every client whose owner was dropped (`shutdown_soon`) has stopped its engine."""
    deadline = time.monotonic() + timeout_s
    for client in list(_live_clients):
        if client._shutdown_requested or client._shutdown_started:
            client._shutdown_done.wait(max(0.0, deadline - time.monotonic()))


@atexit.register
def _shutdown_all() -> None:
    for client in list(_live_clients):
        try:
            client.shutdown()
        except Exception:
            pass
