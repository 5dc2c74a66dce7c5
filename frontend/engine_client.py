"""The frontend's client of engine-core: callers' threads submit, a private I/O thread talks.

Three parts, each in its own module: the link to engine-core (`core_connection.py`: spawn or
connect, handshake, liveness), what the engine owes us (`request_registry.py`: caller's ids
-> engine ids, n > 1 children, utility calls) and how its outputs reach the callers
(`output_delivery.py`). One `Lifecycle` (`client_state.py`) says where the client is.

Callers from any thread or event loop encode their frames themselves and queue them; the I/O
thread owns the sockets: it forwards the frames, folds engine outputs into each request's
`RequestStream`, and fails every stream and pending call with `EngineDeadError` the moment
the engine is gone. It never holds a lock that submission needs while it detokenizes.

A client of a daemon outlives the daemon: when the connection is lost (the daemon died,
restarted, forgot us, or was silent for `heartbeat_timeout`) in-flight requests fail, and
the client reconnects by itself. Requests submitted meanwhile wait for the daemon's Ready;
they fail at once while nothing listens at the address, and after `heartbeat_timeout` if
nothing answers. A daemon that comes back serving another model ends the client (DEAD).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import msgspec
import zmq

from zllm.frontend import output_delivery
from zllm.frontend.client_state import ClientState, Lifecycle
from zllm.frontend.core_connection import POLL_MS, CoreConnection
from zllm.frontend.errors import EngineDeadError
from zllm.frontend.input_processor import ProcessedRequest
from zllm.frontend.parallel_sampling import fan_out
from zllm.frontend.pooling_state import PoolingRequestState
from zllm.frontend.request_registry import EngineRequest, RequestRegistry
from zllm.frontend.stream import RequestStream
from zllm.protocol.config import EngineArgs
from zllm.protocol.messages import (
    AbortRequests,
    AddRequest,
    Disconnected,
    EncodedAddRequests,
    EngineDead,
    FrameRejected,
    Goodbye,
    Heartbeat,
    Ready,
    StartupFailed,
    StepOutputs,
    UtilityCall,
    UtilityReply,
    decode_core_message,
    encode,
)
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

logger = logging.getLogger("zllm.frontend")

_PARAMS_FIELD = {SamplingParams: "sampling_params", PoolingParams: "pooling_params"}
FRAME_OVERHEAD = 1024  # room for the `AddRequests` envelope around encoded requests


class EngineClient:
    def __init__(self, engine_args: EngineArgs, tokenizer=None, *, wait: bool = True) -> None:
        """Spawn engine-core (or connect to a daemon) and say hello.

        With `wait=False` the caller does other start-up work (loading the tokenizer) while the
        core starts, then calls `wait_ready()`.
        """
        self.engine_args = engine_args
        self.tokenizer = tokenizer
        self.lifecycle = Lifecycle()
        self.registry = RequestRegistry()
        self.ready: Ready | None = None
        self.io_thread: threading.Thread | None = None
        # (engine id, encoded AddRequest), (call id, UtilityCall), or a message: what is
        # queued for a request or call no longer pending is never sent.
        # A deque, not a `queue.Queue`: appends and pops are atomic, and a batch of 10,000
        # adds must not pay a lock and a condition per request.
        self.outgoing: collections.deque[tuple[Any, msgspec.Struct | msgspec.Raw]] = (
            collections.deque()
        )
        self._abandoned: collections.deque[str] = collections.deque()  # see `abort_soon`
        self._owner_dropped = False  # see `shutdown_soon`
        self._call_ids = itertools.count()
        self._held = 0  # > 0 inside `holding()`
        self._held_lock = threading.Lock()
        self._closer: threading.Thread | None = None  # the thread running `shutdown`
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        try:
            self.conn = CoreConnection(engine_args)
        except BaseException:
            self._release_wakeup()
            self.lifecycle.advance(ClientState.CLOSED)
            raise
        if wait:
            self.wait_ready()

    # ---- views ---------------------------------------------------------------------------------

    @property
    def proc(self):
        return self.conn.proc

    @property
    def input_address(self) -> str:
        return self.conn.input_address

    @property
    def output_address(self) -> str:
        return self.conn.output_address

    @property
    def state(self) -> ClientState:
        return self.lifecycle.state

    @property
    def dead_error(self):
        """The error every call raises once the engine is dead or shut down, else None."""
        return self.lifecycle.error if self.lifecycle.finished else None

    # ---- start-up --------------------------------------------------------------------------------

    def wait_ready(self) -> Ready:
        """Finish the handshake and start the I/O thread; raise the core's own start-up error."""
        if self.ready is not None:
            return self.ready
        try:
            self.ready = self.conn.handshake()
        except BaseException:
            self._release(kill=True)
            raise
        self.lifecycle.advance(ClientState.RUNNING)
        self.io_thread = threading.Thread(target=self._io_loop, name="zllm-client-io", daemon=True)
        self.io_thread.start()
        _live_clients.add(self)
        return self.ready

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
        entries = [
            EngineRequest(request_id, f"{cid}-{suffix}", state, stream)
            for cid, _, state in children
        ]
        frames = [
            msgspec.Raw(
                encode(
                    AddRequest(
                        request_id=entry.engine_id,
                        prompt_token_ids=request.prompt_token_ids,
                        arrival_time=state.metrics.arrival_time,
                        priority=request.priority,
                        **{_PARAMS_FIELD[type(child_params)]: child_params},
                    )
                )
            )
            for entry, (_, child_params, state) in zip(entries, children)
        ]
        limit = self.ready.max_frame_bytes - FRAME_OVERHEAD if self.ready else None
        if limit is not None and len(frames[0]) > limit:
            raise ValueError(
                f"request {request_id!r} is {len(frames[0])} bytes encoded; engine-core reads "
                f"frames of at most {limit} bytes (a shorter prompt fits)"
            )
        self.registry.add(entries, admit=self._admit)
        for entry, frame in zip(entries, frames):
            self._enqueue(frame, entry.engine_id)
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Stop requests in the engine; each stream gets a last output with finish_reason "abort"."""
        entries = [e for rid in request_ids for e in self.registry.forget_request(rid)]
        output_delivery.finish_aborted(entries)
        if entries and self.lifecycle.state is ClientState.RUNNING:
            self._enqueue(AbortRequests(request_ids=[e.engine_id for e in entries]))

    def abort_soon(self, request_id: str) -> None:
        """`abort` from a finalizer: never takes a lock (the GC may run while one is held);
        the I/O thread does the abort."""
        self._abandoned.append(request_id)
        self._wake()

    def call(self, method: str, *args: Any) -> concurrent.futures.Future:
        """Run a utility method in engine-core; the future resolves from the I/O thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._call_ids)
        try:
            self.registry.add_call(call_id, future, admit=self._admit)
        except Exception as e:
            future.set_exception(e)
            return future
        self._enqueue(UtilityCall(call_id=call_id, method=method, args=list(args)), call_id)
        return future

    def check_alive(self) -> None:
        """Raise `EngineDeadError` unless the engine answers now."""
        self.lifecycle.check()
        if self.lifecycle.state is ClientState.RECONNECTING:
            raise EngineDeadError(
                f"not connected to engine-core at {self.conn.address} (reconnecting)"
            )

    def _admit(self) -> None:
        """Raise unless the client takes requests now (called under the registry's lock)."""
        if not self.lifecycle.accepts_requests:
            self.lifecycle.check()

    def _enqueue(self, message: msgspec.Struct | msgspec.Raw, key: Any = None) -> None:
        self.outgoing.append((key, message))
        self._wake()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Queue requests without waking the I/O thread, then send them together."""
        with self._held_lock:
            self._held += 1
        try:
            yield
        finally:
            with self._held_lock:
                self._held -= 1
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
        while not self.lifecycle.finished:
            try:
                events = self.conn.poll(POLL_MS, self._wake_r)
                if self._wake_r.fileno() in events:
                    self._drain_wakeups()
                if self._owner_dropped:
                    self.shutdown()
                    return
                while self._abandoned:
                    self.abort([self._abandoned.popleft()])
                if self.lifecycle.state is ClientState.RUNNING:
                    self._flush_outgoing()
                    self._heartbeat()
                for frame in self.conn.received(events):
                    self._on_frame(frame)
                self._watch_link(events)
            except Exception as e:  # never leave callers waiting on a broken I/O thread
                logger.exception("client I/O thread failed")
                self._die(f"client I/O thread failed: {type(e).__name__}: {e}")
                return

    def _watch_link(self, events: dict) -> None:
        """A spawned core's exit is death; a daemon's lost link means reconnecting."""
        if self.lifecycle.finished:
            return
        if not self.conn.is_daemon:
            cause = self.conn.core_exited()
            if cause is not None:
                for frame in self.conn.last_words():
                    self._on_frame(frame)
                self._die(cause)
            return
        for event in self.conn.link_events(events):
            if event.kind == "lost":
                self._connection_lost(event.error)
            elif self.lifecycle.state is ClientState.RECONNECTING:
                self._fail_waiting(f"{event.error}; the client reconnects when one answers")
        if self.lifecycle.state is ClientState.RECONNECTING:  # nothing answered for too long
            timeout = self.engine_args.heartbeat_timeout
            self._fail_waiting(
                f"engine-core at {self.conn.address} did not answer for {timeout:g} s "
                "(heartbeat_timeout); the client keeps trying to reconnect",
                submitted_before=time.monotonic() - timeout,
            )

    def _heartbeat(self) -> None:
        """Tell a daemon we are alive when we have said nothing for a while."""
        timeout = self.ready.client_timeout_s if self.ready is not None else None
        if timeout and time.monotonic() - self.conn.last_sent >= min(1.0, timeout / 4):
            self.conn.send(encode(Heartbeat()))

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _flush_outgoing(self) -> None:
        """Send what callers queued, in order, skipping requests and calls that ended before
        they went out; adjacent adds (already encoded by the threads that submitted them)
        travel as one `AddRequests`, split below engine-core's frame limit."""
        limit = self.ready.max_frame_bytes - FRAME_OVERHEAD
        adds: list[msgspec.Raw] = []
        size = 0
        while True:
            try:
                key, message = self.outgoing.popleft()
            except IndexError:
                key, message = None, None
            if isinstance(message, msgspec.Raw) and self.registry.get(key) is None:
                continue  # aborted or failed before it was sent
            if isinstance(message, UtilityCall) and not self.registry.has_call(key):
                continue
            if adds and (not isinstance(message, msgspec.Raw) or size + len(message) > limit):
                frame = adds[0] if len(adds) == 1 else encode(EncodedAddRequests(requests=adds))
                self.conn.send(frame)
                adds, size = [], 0
            if isinstance(message, msgspec.Raw):
                adds.append(message)
                size += len(message)
            elif message is None:
                return
            else:
                self.conn.send(encode(message))

    def _on_frame(self, frame: bytes) -> None:
        try:
            message = decode_core_message(frame)
        except msgspec.MsgspecError as e:
            logger.warning("dropping an undecodable frame from engine-core: %s", e)
            return
        if isinstance(message, StepOutputs):
            now = message.timestamp or time.time()
            to_abort = output_delivery.deliver(self.registry, message.updates, now)
            if to_abort:
                self.conn.send(encode(AbortRequests(request_ids=to_abort)))
        elif isinstance(message, UtilityReply):
            future = self.registry.pop_call(message.call_id)
            if future is not None and not future.done():
                if message.error is None:
                    future.set_result(message.result)
                elif message.error_kind == "permission":
                    future.set_exception(PermissionError(message.error))
                else:
                    future.set_exception(RuntimeError(message.error))
        elif isinstance(message, FrameRejected):
            logger.error("engine-core could not read a frame from this client: %s", message.error)
        elif isinstance(message, EngineDead):
            if self.conn.is_daemon:
                self._connection_lost(
                    f"engine-core at {self.conn.address} stopped: {message.error}"
                )
            else:
                self._die(message.error)
        elif isinstance(message, Disconnected):
            self._connection_lost(f"engine-core at {self.conn.address}: {message.error}")
        elif isinstance(message, Ready):
            self._reconnected(message)
        elif isinstance(message, StartupFailed):
            self._fail_waiting(
                f"engine-core at {self.conn.address} failed to start: {message.error}"
            )

    # ---- a daemon's link ---------------------------------------------------------------------

    def _connection_lost(self, cause: str) -> None:
        """Fail what was in flight, open fresh sockets and wait for a daemon's Ready."""
        if self.lifecycle.advance(ClientState.RECONNECTING):
            logger.warning("%s: failing requests in flight; reconnecting", cause)
            self._fail_waiting(f"{cause}; the client reconnects by itself for new requests")
        elif self.lifecycle.state is not ClientState.RECONNECTING:
            return
        self.conn.open()

    def _reconnected(self, ready: Ready) -> None:
        if self.lifecycle.state is not ClientState.RECONNECTING:
            return
        old = self.ready
        if (ready.model_files_digest, ready.model_config.max_model_len) != (
            old.model_files_digest,
            old.model_config.max_model_len,
        ):
            self._die(
                f"engine-core at {self.conn.address} came back serving another model "
                f"({ready.model_config.path}): start a new client for it"
            )
            return
        self.ready = ready
        if self.lifecycle.advance(ClientState.RUNNING):
            logger.info("reconnected to engine-core at %s", self.conn.address)

    def _fail_waiting(self, message: str, submitted_before: float | None = None) -> None:
        """Fail the requests and calls waiting for the engine (all, or those older than a time)."""
        entries, calls = self.registry.pop_all(submitted_before)
        output_delivery.fail(entries, message)
        for future in calls:
            if not future.done():
                future.set_exception(EngineDeadError(message))

    def _die(self, cause: str) -> None:
        message = "the engine died: " + cause
        if not self.lifecycle.advance(ClientState.DEAD, message):
            return  # dead already, or shutting down
        logger.error("%s", message)
        self._fail_everything()

    def _fail_everything(self) -> None:
        """End every stream and pending call with the lifecycle's error. Runs after the state
        stopped taking requests, so nothing registers behind it."""
        self._fail_waiting(str(self.lifecycle.error))

    # ---- shutdown ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the engine this client started (or leave a daemon's), release everything.

        Idempotent; a call that finds another thread shutting down waits until it is done, so
        when any `shutdown()` returns (at exit, say) the engine's processes are gone.
        """
        was = self.lifecycle.state
        if not self.lifecycle.advance(ClientState.CLOSING):
            if threading.current_thread() not in (self._closer, self.io_thread):
                self.lifecycle.closed.wait(timeout=30)
            return
        self._closer = threading.current_thread()
        try:
            thread = self.io_thread
            if thread is not None and thread.is_alive() and thread is not self._closer:
                thread.join(timeout=2)
            if self.conn.is_daemon and was in (ClientState.RUNNING, ClientState.RECONNECTING):
                with contextlib.suppress(zmq.ZMQError):  # a daemon: drop our requests
                    self.conn.send(encode(Goodbye()))
            self._release(kill=False)
        finally:
            _live_clients.discard(self)

    def shutdown_soon(self) -> None:
        """`shutdown` from a finalizer: the GC may run it on any thread, even the I/O thread
        while it holds a lock, so the I/O thread does the shutdown."""
        if self.io_thread is not None and self.io_thread.is_alive():
            self._owner_dropped = True
            self._wake()
        else:
            self.shutdown()

    def _release(self, kill: bool) -> None:
        """Close the connection (stopping a spawned core), fail what is left, end in CLOSED."""
        try:
            self.conn.close(kill=kill)
            self._release_wakeup()
        finally:
            self.lifecycle.advance(ClientState.CLOSING)  # from STARTING, when start-up failed
            self._fail_everything()
            self.lifecycle.advance(ClientState.CLOSED)

    def _release_wakeup(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


_live_clients: weakref.WeakSet[EngineClient] = weakref.WeakSet()


def wait_for_dropped_clients(timeout_s: float = 30.0) -> None:
    """Wait until every client whose owner was dropped (`shutdown_soon`) has stopped its engine."""
    deadline = time.monotonic() + timeout_s
    for client in list(_live_clients):
        if client._owner_dropped or client.state is ClientState.CLOSING:
            client.lifecycle.closed.wait(max(0.0, deadline - time.monotonic()))


@atexit.register
def _shutdown_all() -> None:
    for client in list(_live_clients):
        try:
            client.shutdown()
        except Exception:
            pass
