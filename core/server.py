"""The engine-core process: sockets to frontends, an input thread, an output thread and the busy loop.

    input ROUTER  (bound) <- each client's DEALER: AddRequest(s), AbortRequests, UtilityCall, Goodbye
    output ROUTER (bound) -> each client's DEALER: Ready, StepOutputs, UtilityReply, EngineDead
                          <- Hello (sent on the output socket so the core can route back to it)

The main thread owns the engine: `drain input -> schedule -> execute -> update -> emit`,
blocking on the input queue when there is nothing to run. Any number of clients may
connect (a shared daemon); outputs go back by client identity.
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

from zllm.core.engine_core import EngineCore
from zllm.core.executor import create_executor
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.messages import (
    PROTOCOL_VERSION,
    AbortRequests,
    AddRequest,
    AddRequests,
    EngineDead,
    Goodbye,
    Hello,
    Ready,
    StartupFailed,
    StepOutputs,
    UtilityCall,
    UtilityReply,
    decode_client_message,
    encode,
)
from zllm.protocol.process import remove_socket_file, restrict_socket_file

logger = logging.getLogger("zllm.core")

IDLE_HEALTH_CHECK_S = 0.5
UTILITY_METHODS = frozenset(
    {"reset_prefix_cache", "sleep", "wake_up", "is_sleeping", "get_stats", "check_health"}
)


def _client_message(frames: list[bytes], socket_name: str) -> tuple[bytes, Any] | None:
    """(client identity, message) from a ROUTER's frames, or None (logged) if they are not one
    identity plus one decodable frame: a stray peer must not kill the socket's thread."""
    if len(frames) != 2:
        logger.warning(
            "dropping a %d-frame message on the %s socket (one frame expected)",
            len(frames) - 1,
            socket_name,
        )
        return None
    identity, frame = frames
    try:
        return identity, decode_client_message(frame)
    except msgspec.MsgspecError as e:
        logger.warning(
            "dropping an undecodable frame from client %s on the %s socket: %s",
            identity.hex(),
            socket_name,
            e,
        )
        return None


class _Shutdown(Exception):
    """Raised in the main thread by SIGTERM/SIGINT."""


class EngineCoreServer:
    def __init__(
        self,
        engine_args: EngineArgs,
        input_address: str,
        output_address: str,
        owns_addresses: bool = True,
    ) -> None:
        self.engine_args = engine_args
        self.input_address = input_address
        self.output_address = output_address
        self.owns_addresses = owns_addresses
        self.inbox: queue.Queue[tuple[bytes, Any]] = queue.Queue()
        self.clients: set[bytes] = set()
        self.engine: EngineCore | None = None
        self.ready: Ready | None = None
        self.ctx = zmq.Context()
        self.outbox_address = f"inproc://outbox-{id(self)}"
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.bind(self.outbox_address)
        self.stopping = threading.Event()

    # ---- threads ---------------------------------------------------------------------------

    def _input_thread(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.input_address)
        restrict_socket_file(self.input_address)
        self._bound.release()
        while not self.stopping.is_set():
            if not sock.poll(200):
                continue
            received = _client_message(sock.recv_multipart(), "input")
            if received is not None:
                self.inbox.put(received)
        sock.close(0)

    def _output_thread(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.bind(self.output_address)
        restrict_socket_file(self.output_address)
        pull = self.ctx.socket(zmq.PULL)
        pull.connect(self.outbox_address)
        self._bound.release()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        while True:
            events = dict(poller.poll(200))
            if pull in events:
                frames = pull.recv_multipart()
                if frames == [b"stop"]:
                    break
                try:
                    sock.send_multipart(frames)
                except zmq.ZMQError as e:
                    logger.warning("could not send to client %s: %s", frames[0].hex(), e)
            if sock in events:
                received = _client_message(sock.recv_multipart(), "output")
                if received is not None:
                    self.inbox.put(received)
        sock.close()
        pull.close()

    def _send(self, client: bytes, message: msgspec.Struct) -> None:
        self.outbox.send_multipart([client, encode(message)])

    # ---- lifecycle -------------------------------------------------------------------------

    def serve(self, exit_after_startup_failure_s: float = 30.0) -> int:
        """Run until SIGTERM/SIGINT or a fatal error; return the exit code."""
        self._bound = threading.Semaphore(0)
        self.threads = threads = [
            threading.Thread(target=self._input_thread, name="zllm-core-input", daemon=True),
            threading.Thread(target=self._output_thread, name="zllm-core-output", daemon=True),
        ]
        for t in threads:
            t.start()
        for _ in threads:
            self._bound.acquire()

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
            self._close()
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
            while True:
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
            stats = engine.stats()
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
                self._send(
                    client,
                    StepOutputs(updates=refusals, stats=engine.stats(), timestamp=time.time()),
                )
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

    def _utility(self, call: UtilityCall) -> UtilityReply:
        engine = self.engine
        if call.method not in UTILITY_METHODS:
            return UtilityReply(
                call_id=call.call_id, error=f"unknown utility method {call.method!r}"
            )
        try:
            if call.method == "get_stats":
                result: Any = engine.stats()
            elif call.method == "check_health":
                engine.executor.check_health()
                result = True
            else:
                result = getattr(engine, call.method)(*call.args)
            return UtilityReply(call_id=call.call_id, result=result)
        except Exception as e:
            return UtilityReply(call_id=call.call_id, error=f"{type(e).__name__}: {e}")

    def _broadcast_dead(self, error: str) -> None:
        for client in self.clients:
            self._send(client, EngineDead(error=error))

    def _close(self) -> None:
        self.stopping.set()
        self.outbox.send_multipart([b"stop"])
        if self.engine is not None:
            try:
                self.engine.shutdown()
            except Exception:
                logger.exception("error while stopping workers")
        for thread in self.threads:
            thread.join(timeout=3)
        if self.owns_addresses:
            remove_socket_file(self.input_address)
            remove_socket_file(self.output_address)
