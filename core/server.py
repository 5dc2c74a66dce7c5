"""The engine-core process: the busy loop that serves every client's requests.

The main thread owns the engine: `drain inbox -> schedule -> execute -> update -> emit`,
blocking on the inbox when there is nothing to run. Around it:
- `client_sockets.py`: the client sockets and their threads (frames read and answered at
  the edge, liveness noted, silent clients found);
- `client_registry.py`: who is connected; `security.py`: Curve, socket modes, admin role;
- `systemd_notify.py`: loading, ready, watchdog pings from this loop, stopping;
- `utilities.py`: utility calls (and who may make them); `drain.py`: stopping gracefully.

Any number of clients may connect (a shared daemon); outputs go back by client identity.
SIGTERM (or an admin's "shutdown" call) drains: no new request is admitted, running ones
may finish for `drain_timeout`, the rest are aborted, and the process exits 0.
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

import zmq

from zllm.core.client_frames import FrameReader
from zllm.core.client_registry import ClientRegistry
from zllm.core.client_sockets import ClientGone, ClientSockets
from zllm.core.drain import Drain
from zllm.core.engine_core import EngineCore
from zllm.core.executor import create_executor
from zllm.core.security import ListenError, Security, check_address
from zllm.core.server_options import ServerOptions
from zllm.core.systemd_notify import SystemdNotifier
from zllm.core.utilities import Utilities
from zllm.core.warm_up import warm_up
from zllm.protocol import model_files
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
    RequestUpdate,
    SchedulerStats,
    StartupFailed,
    StepOutputs,
    UtilityCall,
)
from zllm.protocol.process import freeze_startup_heap

logger = logging.getLogger("zllm.core")

IDLE_HEALTH_CHECK_S = 0.5
MESSAGES_PER_STEP = 512  # inbox items handled between two steps: a flood cannot stall the batch
STARTUP_LIMIT_S = float(os.environ.get("ZLLM_STARTUP_TIMEOUT", "900"))


class _Shutdown(Exception):
    """Raised in the main thread by SIGTERM/SIGINT while loading, or by a second signal."""


class EngineCoreServer:
    def __init__(
        self,
        engine_args: EngineArgs,
        input_address: str,
        output_address: str,
        options: ServerOptions | None = None,
    ) -> None:
        self.engine_args = engine_args
        self.input_address = input_address
        self.output_address = output_address
        self.options = options or ServerOptions.spawned()
        self.engine: EngineCore | None = None
        self.ready: Ready | None = None
        self.model_files: dict[str, bytes] = {}
        self.ctx = zmq.Context()
        self.reader = FrameReader(logger)
        self.clients = ClientRegistry(self.options.client_timeout)
        self.security = Security(self.options)
        self.sockets = ClientSockets(
            self.ctx,
            (input_address, output_address),
            self.reader,
            self.clients,
            self.security,
            self.options,
        )
        self.sockets.busy = lambda: self.engine is not None and self.engine.has_work()
        self.notifier = SystemdNotifier.from_environ()
        self.listening = False
        self.serving = False  # past start-up: a signal drains instead of interrupting
        self.stop_reason: str | None = None  # set by a signal or a "shutdown" call: drain
        self.drain: Drain | None = None
        self.utilities: Utilities | None = None
        self.closed = False

    # ---- start-up ----------------------------------------------------------------------------

    def listen(self) -> None:
        """Bind both client sockets, in the calling thread, so that a taken, impossible or
        unprotected address is an error at once (`ListenError`), before any model is loaded."""
        check_address(self.input_address, self.options)
        self.security.start(self.ctx)
        self.sockets.listen()
        self.listening = True

    def serve(self, exit_after_startup_failure_s: float = 30.0) -> int:
        """Run until SIGTERM/SIGINT or a fatal error; return the exit code."""
        if not self.listening:
            try:
                self.listen()
            except ListenError as e:
                logger.error("%s", e)
                self.close()
                return 1
        self.sockets.start()

        def on_signal(signum: int, frame: object) -> None:
            name = signal.Signals(signum).name
            if not self.serving or self.stop_reason is not None or not self.options.drain_timeout:
                raise _Shutdown(name)  # loading, a second signal, or no drain: stop now
            self.stop_reason = name

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
                self.notifier.send(f"STATUS=failed to start: {error[:200]}")
                self._answer_hellos_with_failure(error, exit_after_startup_failure_s)
                return 1
            self.serving = True
            frozen = freeze_startup_heap()
            logger.debug("start-up heap frozen: %d objects", frozen)
            self.notifier.ready(self._status())
            self._loop()
            logger.info("engine-core stopped (%s)", self.stop_reason)
            self._broadcast_dead(f"the engine-core was shut down ({self.stop_reason})")
        except _Shutdown as e:
            logger.info("engine-core stopping (%s)", e)
            self.notifier.stopping(f"stopping ({e})")
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
        loaded = threading.Event()
        self.notifier.send(f"STATUS=loading {path}")
        self.notifier.keep_extending(loaded, STARTUP_LIMIT_S)
        try:
            model_config = ModelConfig.from_path(
                path, args.tokenizer, args.max_model_len, args.resolved_runner()
            )
            device = args.resolved_device()
            model_config.dtype = args.resolved_dtype(device)
            self.model_files = model_files.read_model_files(path, model_config.tokenizer)
            executor = create_executor(args, model_config)
            try:
                self.engine = EngineCore(args, model_config, executor)
            except BaseException:
                executor.shutdown()
                raise
            if self.options.warm_up:
                took = warm_up(self.engine, args.step_timeout)
                logger.info("warm-up request done in %.2f s", took)
        finally:
            loaded.set()
        self.ready = Ready(
            protocol_version=PROTOCOL_VERSION,
            engine_args=args,
            model_config=model_config,
            num_kv_blocks=self.engine.kv.num_blocks,
            max_num_batched_tokens=self.engine.max_num_batched_tokens,
            core_pid=os.getpid(),
            client_timeout_s=self.options.client_timeout,
            model_files_digest=model_files.digest(self.model_files),
            max_frame_bytes=self.reader.max_frame_bytes,
        )
        self.reader.limits = self.engine.limits
        self.utilities = Utilities(self.engine, self._stats, self.model_files, self._stop)
        logger.info("engine-core ready: %s, %d KV blocks", path, self.engine.kv.num_blocks)

    def _answer_hellos_with_failure(self, error: str, wait_s: float) -> None:
        """Tell every client that says hello why we could not start, then leave."""
        deadline = time.monotonic() + wait_s
        answered = False
        while time.monotonic() < deadline and not answered:
            try:
                client, message, _ = self.sockets.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(message, Hello):
                self.sockets.send(client, StartupFailed(error=error))
                answered = True

    # ---- the busy loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        assert engine is not None
        inbox = self.sockets.inbox
        interval = self.notifier.watchdog_interval
        idle_wait = min(IDLE_HEALTH_CHECK_S, interval / 2) if interval else IDLE_HEALTH_CHECK_S
        while True:
            self.notifier.tick(self._status)  # WATCHDOG=1 comes from here, and only here
            if self.stop_reason is not None:
                if self.drain is None:
                    self.drain = Drain(
                        engine,
                        self.stop_reason,
                        self.options.drain_timeout,
                        self.reader,
                        self.notifier,
                    )
                over, aborted = self.drain.done()
                self._emit(aborted)
                if over:
                    return
            if not engine.has_work():
                try:
                    item = inbox.get(timeout=idle_wait)
                except queue.Empty:
                    engine.executor.check_health()
                    continue
                self._handle(*item)
            for _ in range(MESSAGES_PER_STEP):
                try:
                    self._handle(*inbox.get_nowait())
                except queue.Empty:
                    break
            if engine.has_work():
                self._emit(engine.step())

    def _emit(self, updates: list[tuple[bytes, RequestUpdate]]) -> None:
        """One `StepOutputs` to each client with moved requests."""
        if not updates:
            return
        per_client: dict[bytes, list[RequestUpdate]] = defaultdict(list)
        for client, update in updates:
            per_client[client].append(update)
        stats = self._stats()
        now = time.time()
        for client, client_updates in per_client.items():
            self.sockets.send(
                client, StepOutputs(updates=client_updates, stats=stats, timestamp=now)
            )

    def _handle(self, client: bytes, message: Any, is_admin: bool) -> None:
        engine = self.engine
        assert engine is not None
        if isinstance(message, AddRequest | AddRequests):
            adds = message.requests if isinstance(message, AddRequests) else [message]
            if self.drain is not None:  # queued before the drain began
                refusals = [self.drain.refused(a.request_id) for a in adds]
            else:
                refusals = [r for r in (engine.add_request(client, a) for a in adds) if r]
            if refusals:
                self.sockets.send(client, StepOutputs(updates=refusals, timestamp=time.time()))
        elif isinstance(message, AbortRequests):
            engine.abort([engine.request_key(client, rid) for rid in message.request_ids])
        elif isinstance(message, UtilityCall):
            self.sockets.send(client, self.utilities.call(client, message, is_admin))
        elif isinstance(message, Hello):
            if message.protocol_version != PROTOCOL_VERSION:
                self.sockets.send(
                    client,
                    StartupFailed(
                        error=f"protocol version mismatch: client speaks {message.protocol_version}, "
                        f"engine-core speaks {PROTOCOL_VERSION}"
                    ),
                )
                return
            self.clients.add(client, message.client_name)
            self.sockets.send(client, self.ready)
        elif isinstance(message, Goodbye):
            self._forget_client(client)
        elif isinstance(message, ClientGone):
            aborted = self._forget_client(client)
            logger.warning(
                "client %s (%s) was silent for %.1f s (client timeout %s s): forgotten, "
                "%d request(s) aborted",
                message.name or "?",
                client.hex()[:8],
                message.silent_s,
                self.options.client_timeout,
                aborted,
            )

    def _forget_client(self, client: bytes) -> int:
        assert self.engine is not None
        self.clients.remove(client)
        self.engine.scheduler.admission_order.forget(client)
        return len(self.engine.abort_client(client))

    def _stats(self) -> SchedulerStats:
        assert self.engine is not None
        stats = self.engine.stats()
        stats.num_rejected_frames = self.reader.num_rejected
        stats.num_clients = len(self.clients)
        return stats

    def _status(self) -> str:
        """One line for systemd's STATUS=."""
        s = self._stats()
        state = f"draining ({self.stop_reason})" if self.stop_reason else "serving"
        return (
            f"{state} {self.engine_args.model}: {s.num_clients} clients, {s.num_running} running, "
            f"{s.num_waiting} waiting, KV blocks {s.kv_blocks_used}/{s.kv_blocks_total}"
        )

    # ---- stopping --------------------------------------------------------------------------------

    def _stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def _broadcast_dead(self, error: str) -> None:
        for client in self.clients.identities():
            self.sockets.send(client, EngineDead(error=error))

    def close(self) -> None:
        """Stop the threads and workers, remove the socket files we bound. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.engine is not None:
            try:
                self.engine.shutdown()
            except Exception:
                logger.exception("error while stopping workers")
        self.sockets.close()
        self.security.stop()
        self.notifier.close()
