"""The frontend's connection to engine-core: spawns it (or connects to a daemon), and runs a
private I/O thread that owns both sockets.

Callers from any thread or event loop hand requests to the I/O thread through a queue;
the I/O thread turns engine outputs into `RequestOutput`s and puts them into each
request's `RequestStream`. If the engine dies, every stream and every pending call gets
`EngineDeadError` at once.
"""

from __future__ import annotations

import atexit
import concurrent.futures
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
from typing import Any

import msgspec
import zmq

from zllm.frontend.errors import EngineDeadError, EngineStartupError
from zllm.frontend.output_processor import RequestState
from zllm.frontend.stream import ConsumerGone, RequestStream
from zllm.protocol.config import EngineArgs
from zllm.protocol.messages import (
    PROTOCOL_VERSION,
    AbortRequests,
    AddRequest,
    EngineDead,
    Goodbye,
    Hello,
    Ready,
    StartupFailed,
    StepOutputs,
    UtilityCall,
    UtilityReply,
    decode_core_message,
    encode,
)
from zllm.protocol.process import core_addresses, private_ipc_address, remove_socket_file
from zllm.protocol.sampling_params import SamplingParams

logger = logging.getLogger("zllm.frontend")

POLL_MS = 100
STARTUP_TIMEOUT_S = float(os.environ.get("ZLLM_STARTUP_TIMEOUT", "900"))


class EngineClient:
    def __init__(self, engine_args: EngineArgs, tokenizer) -> None:
        self.engine_args = engine_args
        self.tokenizer = tokenizer
        self.identity = uuid.uuid4().bytes
        self.proc: subprocess.Popen | None = None
        self.ctx = zmq.Context()
        self.requests: dict[str, tuple[RequestState, RequestStream]] = {}
        self.lock = threading.Lock()
        self.outgoing: queue.Queue[msgspec.Struct] = queue.Queue()
        self.calls: dict[int, concurrent.futures.Future] = {}
        self.call_ids = itertools.count()
        self.dead_error: EngineDeadError | None = None
        self.last_stats = None
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

        if engine_args.engine_core_address:
            self.input_address, self.output_address = core_addresses(
                engine_args.engine_core_address
            )
        else:
            self.input_address, self._ipc_dir = private_ipc_address("core-input")
            self.output_address = f"ipc://{self._ipc_dir}/core-output.sock"
            self._spawn_core()
        try:
            self.input = self._socket(self.input_address)
            self.output = self._socket(self.output_address)
            self.ready = self._handshake()
        except BaseException:
            self._close_resources(kill=True)
            raise
        self.io_thread = threading.Thread(target=self._io_loop, name="zllm-client-io", daemon=True)
        self.io_thread.start()
        _live_clients.add(self)

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
        )
        self.proc.stdin.write(msgspec.json.encode(self.engine_args))
        self.proc.stdin.close()

    def _socket(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        return sock

    def _handshake(self) -> Ready:
        self.output.send(
            encode(Hello(protocol_version=PROTOCOL_VERSION, client_name=f"pid-{os.getpid()}"))
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
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
                    f"engine-core exited with code {self.proc.returncode} before it was ready (see its log above)"
                )
        raise EngineStartupError(
            f"engine-core at {self.output_address} did not answer within {STARTUP_TIMEOUT_S:.0f}s"
        )

    # ---- requests (any thread) ---------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> RequestStream:
        self.check_alive()
        state = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer)
        stream = RequestStream()
        with self.lock:
            if request_id in self.requests:
                raise ValueError(
                    f"request id {request_id!r} is already in use by a running request"
                )
            self.requests[request_id] = (state, stream)
        self._enqueue(
            AddRequest(
                request_id=request_id,
                prompt_token_ids=prompt_token_ids,
                sampling_params=params,
                arrival_time=state.metrics.arrival_time,
            )
        )
        return stream

    def abort(self, request_ids: list[str]) -> None:
        with self.lock:
            live = [rid for rid in request_ids if self.requests.pop(rid, None) is not None]
        if live and self.dead_error is None and not self._closed:
            self._enqueue(AbortRequests(request_ids=live))

    def call(self, method: str, *args: Any) -> concurrent.futures.Future:
        """Run a utility method in engine-core; the future resolves from the I/O thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.dead_error is not None:
            future.set_exception(self.dead_error)
            return future
        call_id = next(self.call_ids)
        with self.lock:
            self.calls[call_id] = future
        self._enqueue(UtilityCall(call_id=call_id, method=method, args=list(args)))
        return future

    def check_alive(self) -> None:
        if self.dead_error is not None:
            raise self.dead_error
        if self._closed:
            raise EngineDeadError("the engine was shut down")

    def _enqueue(self, message: msgspec.Struct) -> None:
        self.outgoing.put(message)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or closing

    # ---- the I/O thread ------------------------------------------------------------------------

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.output, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._closed:
            try:
                events = dict(poller.poll(POLL_MS))
                if self._wake_r.fileno() in events:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                self._flush_outgoing()
                if self.output in events:
                    while self.output.poll(0):
                        self._on_frame(self.output.recv())
                if self.proc is not None and self.proc.poll() is not None and not self._closed:
                    code = self.proc.returncode
                    self._die(
                        f"engine-core (pid {self.proc.pid}) exited with code {code}"
                        + (" (killed by a signal)" if code < 0 else "")
                    )
                    return
            except Exception as e:  # never leave callers waiting on a broken I/O thread
                logger.exception("client I/O thread failed")
                self._die(f"client I/O thread failed: {type(e).__name__}: {e}")
                return

    def _flush_outgoing(self) -> None:
        while True:
            try:
                message = self.outgoing.get_nowait()
            except queue.Empty:
                return
            self.input.send(encode(message))

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
            if future is not None:
                if message.error is not None:
                    future.set_exception(RuntimeError(message.error))
                else:
                    future.set_result(message.result)
        elif isinstance(message, EngineDead):
            self._die(message.error)

    def _on_outputs(self, message: StepOutputs) -> None:
        self.last_stats = message.stats
        to_abort: list[str] = []
        now = message.timestamp or time.time()
        for update in message.updates:
            with self.lock:
                entry = self.requests.get(update.request_id)
            if entry is None:
                continue  # aborted meanwhile
            state, stream = entry
            if update.error is not None:
                self._finish(update.request_id)
                stream.put(ValueError(update.error))
                continue
            if state.apply(update, now):
                to_abort.append(update.request_id)
            output = state.output()
            if state.finished:
                self._finish(update.request_id)
            if output is not None:
                try:
                    stream.put(output)
                except ConsumerGone:
                    if not state.finished:
                        to_abort.append(update.request_id)
                        self._finish(update.request_id)
        if to_abort:
            self.input.send(encode(AbortRequests(request_ids=to_abort)))

    def _finish(self, request_id: str) -> None:
        with self.lock:
            self.requests.pop(request_id, None)

    def _die(self, cause: str) -> None:
        error = EngineDeadError(f"the engine died: {cause}")
        with self.lock:
            if self.dead_error is not None:
                return
            self.dead_error = error
            entries = list(self.requests.values())
            self.requests.clear()
            calls = list(self.calls.values())
            self.calls.clear()
        for _, stream in entries:
            try:
                stream.put(error)
            except ConsumerGone:
                pass
        for future in calls:
            if not future.done():
                future.set_exception(error)

    # ---- shutdown ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the engine this client started (or leave a daemon's), release everything. Idempotent."""
        if self._closed:
            return
        if self.dead_error is None:
            self._enqueue(Goodbye())
        self._closed = True
        if self.io_thread.is_alive() and threading.current_thread() is not self.io_thread:
            self.io_thread.join(timeout=2)
        try:
            self._flush_outgoing()  # the Goodbye, for a daemon
        except zmq.ZMQError:
            pass
        self._close_resources(kill=False)
        self._die("the engine was shut down")
        _live_clients.discard(self)

    def _close_resources(self, kill: bool) -> None:
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
        for name in ("input", "output"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)
        self.ctx.term()
        self._wake_r.close()
        self._wake_w.close()
        if self.proc is not None:
            remove_socket_file(self.input_address)
            remove_socket_file(self.output_address)


_live_clients: weakref.WeakSet[EngineClient] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for client in list(_live_clients):
        try:
            client.shutdown()
        except Exception:
            pass
