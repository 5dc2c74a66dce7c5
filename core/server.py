"""The engine-core process: sockets to frontends, an input thread, an output thread and the busy loop.

    input ROUTER  (bound) <- each client's DEALER: AddRequest(s), AbortRequests, UtilityCall, Goodbye
    output ROUTER (bound) -> each client's DEALER: Ready, StepOutputs, UtilityReply,
                             FrameRejected, EngineDead
                          <- Hello (sent on the output socket so the core can route back to it)

The main thread owns the engine: `drain input -> schedule -> execute -> update -> emit`,
blocking on the input queue when there is nothing to run. Any number of clients may
connect (a shared daemon); outputs go back by client identity. Every frame a client sends
is answered: a request or call that does not decode gets an error (`core/client_frames.py`).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections import defaultdict
from typing import Any

import msgspec
import zmq

from zllm.core.client_frames import FrameReader
from zllm.core.engine_core import EngineCore
from zllm.core.executor import WorkerDiedError, create_executor
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.messages import (
    PROTOCOL_VERSION,
    AbortRequests,
    AddRequest,
    AddRequests,
    EngineDead,
    FrameRejected,
    Goodbye,
    Hello,
    Ready,
    SchedulerStats,
    StartupFailed,
    StepOutputs,
    UtilityCall,
    UtilityReply,
    encode,
)
from zllm.protocol.process import ipc_listener_alive, remove_socket_file, restrict_socket_file
from zllm.protocol.rpc import check_user_rpc

logger = logging.getLogger("zllm.core")

IDLE_HEALTH_CHECK_S = 0.5
HEALTH_PING_TIMEOUT_S = 10.0  # an idle worker answers a ping in milliseconds
INBOX_LIMIT = 4096  # decoded frames waiting for the main thread; beyond, ZeroMQ pushes back
MESSAGES_PER_STEP = 512  # inbox items handled between two steps: a flood cannot stall the batch
INPUT_YIELD_EVERY, INPUT_YIELD_S = 4, 0.0005  # see `_input_thread`
UTILITY_METHODS = frozenset(
    {"reset_prefix_cache", "sleep", "wake_up", "is_sleeping", "get_stats", "check_health"}
)
UTILITY_METHODS |= {"collective_rpc"}  # a worker method by name (protocol/rpc.py)


class ListenError(RuntimeError):
    """engine-core cannot listen on its address (in use, no such directory, a live daemon)."""


class _Shutdown(Exception):
    """Raised in the main thread by SIGTERM/SIGINT."""


class EngineCoreServer:
    def __init__(self, engine_args: EngineArgs, input_address: str, output_address: str) -> None:
        self.engine_args = engine_args
        self.input_address = input_address
        self.output_address = output_address
        self.inbox: queue.Queue[tuple[bytes, Any]] = queue.Queue(maxsize=INBOX_LIMIT)
        self.clients: set[bytes] = set()
        self.engine: EngineCore | None = None
        self.ready: Ready | None = None
        self.ctx = zmq.Context()
        # Every thread that answers clients pushes [client, frame] here; the output thread
        # owns the client socket and sends.
        self.outbox_address = f"inproc://outbox-{id(self)}"
        self.outbox_pull = self.ctx.socket(zmq.PULL)
        self.outbox_pull.bind(self.outbox_address)
        self.outbox = self._pusher()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.sockets: tuple[zmq.Socket, zmq.Socket] | None = None  # input, output, once bound
        self.bound: list[str] = []  # addresses we bound: only those are ours to remove
        self.closed = False
        self.reader = FrameReader(logger)

    def _pusher(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PUSH)
        sock.connect(self.outbox_address)
        return sock

    # ---- sockets -----------------------------------------------------------------------------

    def listen(self) -> None:
        """Bind both client sockets, in the calling thread, so that a taken or impossible
        address is an error at once (`ListenError`), before any model is loaded."""
        sockets: list[zmq.Socket] = []
        try:
            for address, linger in ((self.input_address, 0), (self.output_address, 1000)):
                if address.startswith("ipc://") and ipc_listener_alive(address):
                    raise ListenError(
                        f"cannot listen on {address}: another engine-core is serving it "
                        "(stop it first, or choose another --address)"
                    )
                sock = self.ctx.socket(zmq.ROUTER)
                sock.setsockopt(zmq.LINGER, linger)
                sockets.append(sock)
                try:
                    sock.bind(address)
                except zmq.ZMQError as e:
                    raise ListenError(f"cannot listen on {address}: {e.strerror}") from None
                self.bound.append(address)
                restrict_socket_file(address)
        except BaseException:
            for sock in sockets:
                sock.close(0)
            self._remove_socket_files()
            raise
        self.sockets = (sockets[0], sockets[1])

    # ---- threads ---------------------------------------------------------------------------

    def _receive(self, sock: zmq.Socket, send: Any, block: bool) -> None:
        """Read one message from a client socket: answer what needs no engine, queue the rest.

        The input thread may wait for room in the inbox (ZeroMQ then holds frames back); the
        output thread must not, as the main thread may be waiting for it to send."""
        frames = sock.recv_multipart()
        message, replies = self.reader.read(frames)
        for reply in replies:
            send(reply)
        if message is None:
            return
        try:
            self.inbox.put((frames[0], message), block=block)
        except queue.Full:
            error = f"engine-core's inbox is full ({INBOX_LIMIT} messages): try again"
            send([frames[0], encode(FrameRejected(error=error))])

    def _input_thread(self, sock: zmq.Socket) -> None:
        answers = self._pusher()
        frames = 0
        while not self.stopping.is_set():
            if sock.poll(200):
                self._receive(sock, answers.send_multipart, block=True)
                frames += 1
                # The busy loop needs the GIL between its torch calls: while it has work, pause
                # now and then, so a flood of frames slows itself (ZeroMQ holds them back),
                # never the batch.
                if frames % INPUT_YIELD_EVERY == 0 and self.engine and self.engine.has_work():
                    time.sleep(INPUT_YIELD_S)
        answers.close(0)
        sock.close(0)

    def _output_thread(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.outbox_pull, zmq.POLLIN)
        while True:
            events = dict(poller.poll(200))
            if self.outbox_pull in events:
                frames = self.outbox_pull.recv_multipart()
                if frames == [b"stop"]:
                    break
                self._send_now(sock, frames)
            if sock in events:
                self._receive(sock, lambda frames: self._send_now(sock, frames), block=False)
        sock.close()
        self.outbox_pull.close()

    @staticmethod
    def _send_now(sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            sock.send_multipart(frames)
        except zmq.ZMQError as e:
            logger.warning("could not send to client %s: %s", frames[0].hex(), e)

    def _send(self, client: bytes, message: msgspec.Struct) -> None:
        self.outbox.send_multipart([client, encode(message)])

    # ---- lifecycle -------------------------------------------------------------------------

    def serve(self, exit_after_startup_failure_s: float = 30.0) -> int:
        """Run until SIGTERM/SIGINT or a fatal error; return the exit code."""
        if self.sockets is None:
            try:
                self.listen()
            except ListenError as e:
                logger.error("%s", e)
                self.close()
                return 1
        assert self.sockets is not None
        input_sock, output_sock = self.sockets
        # Sockets move to their threads here; thread start is the memory barrier ZeroMQ asks for.
        self.threads = [
            threading.Thread(
                target=self._input_thread, args=(input_sock,), name="zllm-core-input", daemon=True
            ),
            threading.Thread(
                target=self._output_thread,
                args=(output_sock,),
                name="zllm-core-output",
                daemon=True,
            ),
        ]
        for t in self.threads:
            t.start()

        def on_signal(signum: int, frame: object) -> None:
            raise _Shutdown(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        code = 0
        try:
            try:
                self._start_engine()
            except _Shutdown:
                raise
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                logger.error("engine-core failed to start:\n%s", traceback.format_exc())
                self._answer_hellos_with_failure(error, exit_after_startup_failure_s)
                return 1
            self._loop()
        except _Shutdown as e:
            logger.info("engine-core stopping (%s)", e)
            self._broadcast_dead("the engine-core was shut down")
        except Exception as e:
            logger.error("engine-core died:\n%s", traceback.format_exc())
            self._broadcast_dead(f"{type(e).__name__}: {e}")
            code = 1
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.close()
        return code

    def _start_engine(self) -> None:
        args = self.engine_args
        path = args.model
        if path is None:
            raise ValueError("engine-core needs a model path (the frontend resolves model names)")
        model_config = ModelConfig.from_path(
            path, args.tokenizer, args.max_model_len, args.resolved_runner()
        )
        device = args.resolved_device()
        model_config.dtype = args.resolved_dtype(device)
        executor = create_executor(args, model_config)
        try:
            self.engine = EngineCore(args, model_config, executor)
        except BaseException:
            executor.shutdown()
            raise
        self.ready = Ready(
            protocol_version=PROTOCOL_VERSION,
            engine_args=args,
            model_config=model_config,
            num_kv_blocks=self.engine.kv.num_blocks,
            max_num_batched_tokens=self.engine.max_num_batched_tokens,
            core_pid=os.getpid(),
        )
        self.reader.limits = self.engine.limits
        logger.info("engine-core ready: %s, %d KV blocks", path, self.engine.kv.num_blocks)

    def _answer_hellos_with_failure(self, error: str, wait_s: float) -> None:
        """Tell every client that says hello why we could not start, then leave."""
        deadline = time.monotonic() + wait_s
        answered = False
        while time.monotonic() < deadline and not answered:
            try:
                client, message = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(message, Hello):
                self._send(client, StartupFailed(error=error))
                answered = True

    def _loop(self) -> None:
        engine = self.engine
        assert engine is not None
        while True:
            if not engine.has_work():
                try:
                    item = self.inbox.get(timeout=IDLE_HEALTH_CHECK_S)
                except queue.Empty:
                    engine.executor.check_health()
                    continue
                self._handle(*item)
            for _ in range(MESSAGES_PER_STEP):
                try:
                    self._handle(*self.inbox.get_nowait())
                except queue.Empty:
                    break
            if not engine.has_work():
                continue
            updates = engine.step()
            if not updates:
                continue
            per_client: dict[bytes, list] = defaultdict(list)
            for client, update in updates:
                per_client[client].append(update)
            stats = self._stats()
            now = time.time()
            for client, client_updates in per_client.items():
                self._send(client, StepOutputs(updates=client_updates, stats=stats, timestamp=now))

    def _handle(self, client: bytes, message: Any) -> None:
        engine = self.engine
        assert engine is not None
        if isinstance(message, AddRequest | AddRequests):
            adds = message.requests if isinstance(message, AddRequests) else [message]
            refusals = [r for r in (engine.add_request(client, a) for a in adds) if r is not None]
            if refusals:
                self._send(client, StepOutputs(updates=refusals, timestamp=time.time()))
        elif isinstance(message, AbortRequests):
            engine.abort([engine.request_key(client, rid) for rid in message.request_ids])
        elif isinstance(message, UtilityCall):
            self._send(client, self._utility(message))
        elif isinstance(message, Hello):
            if message.protocol_version != PROTOCOL_VERSION:
                self._send(
                    client,
                    StartupFailed(
                        error=f"protocol version mismatch: client speaks {message.protocol_version}, "
                        f"engine-core speaks {PROTOCOL_VERSION}"
                    ),
                )
                return
            self.clients.add(client)
            self._send(client, self.ready)
        elif isinstance(message, Goodbye):
            engine.abort_client(client)
            self.clients.discard(client)

    def _stats(self) -> SchedulerStats:
        assert self.engine is not None
        stats = self.engine.stats()
        stats.num_rejected_frames = self.reader.num_rejected
        return stats

    def _utility(self, call: UtilityCall) -> UtilityReply:
        engine = self.engine
        if call.method not in UTILITY_METHODS:
            return UtilityReply(
                call_id=call.call_id, error=f"unknown utility method {call.method!r}"
            )
        try:
            if call.method == "get_stats":
                result: Any = self._stats()
            elif call.method == "check_health":
                engine.executor.check_health()
                engine.executor.ping(min(HEALTH_PING_TIMEOUT_S, self.engine_args.step_timeout))
                result = True
            elif call.method == "collective_rpc":  # a worker method by name, for every rank
                method, args, kwargs = call.args
                check_user_rpc(method, args, kwargs)
                result = engine.executor.collective_rpc(method, *args, kwargs=kwargs)
            else:
                result = getattr(engine, call.method)(*call.args)
            return UtilityReply(call_id=call.call_id, result=result)
        except WorkerDiedError:
            raise  # the engine is broken: every client hears of it, not only this caller
        except Exception as e:
            return UtilityReply(call_id=call.call_id, error=f"{type(e).__name__}: {e}")

    def _broadcast_dead(self, error: str) -> None:
        for client in self.clients:
            self._send(client, EngineDead(error=error))

    def close(self) -> None:
        """Stop the threads and workers, remove the socket files we bound. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.stopping.set()
        if self.threads:
            self.outbox.send_multipart([b"stop"])
        elif self.sockets is not None:  # bound, never served
            for sock in self.sockets:
                sock.close(0)
        if self.engine is not None:
            try:
                self.engine.shutdown()
            except Exception:
                logger.exception("error while stopping workers")
        for thread in self.threads:
            thread.join(timeout=3)
        self._remove_socket_files()

    def _remove_socket_files(self) -> None:
        for address in self.bound:
            remove_socket_file(address)
        self.bound = []
