"""Utility calls: what a client may ask of engine-core besides running requests.

Read-only calls are anyone's; those that change the engine for every client (`sleep`,
`wake_up`, `reset_prefix_cache`, `collective_rpc`, `shutdown`) need the admin role
(`security.ADMIN_METHODS`, checked per call by the socket thread that read it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from zllm.core.engine_core import EngineCore
from zllm.core.executor import WorkerDiedError
from zllm.core.security import ADMIN_METHODS
from zllm.protocol.messages import SchedulerStats, UtilityCall, UtilityReply
from zllm.protocol.rpc import check_user_rpc

logger = logging.getLogger("zllm.core")

HEALTH_PING_TIMEOUT_S = 10.0  # an idle worker answers a ping in milliseconds
ENGINE_METHODS = frozenset({"reset_prefix_cache", "sleep", "wake_up", "is_sleeping"})
UTILITY_METHODS = ENGINE_METHODS | {
    "get_stats",
    "check_health",
    "collective_rpc",  # a worker method by name (protocol/rpc.py), on every rank
    "get_model_files",  # the tokenizer and config files (protocol/model_files.py)
    "shutdown",  # drain and exit, as SIGTERM
}


class Utilities:
    def __init__(
        self,
        engine: EngineCore,
        stats: Callable[[], SchedulerStats],
        model_files: dict[str, bytes],
        stop: Callable[[str], None],
    ) -> None:
        self.engine = engine
        self.stats = stats
        self.model_files = model_files
        self.stop = stop  # begins the drain

    def call(self, client: bytes, call: UtilityCall, is_admin: bool) -> UtilityReply:
        if call.method not in UTILITY_METHODS:
            return UtilityReply(
                call_id=call.call_id, error=f"unknown utility method {call.method!r}"
            )
        if call.method in ADMIN_METHODS and not is_admin:
            return UtilityReply(
                call_id=call.call_id,
                error=f"{call.method} changes the engine for every client and needs the admin "
                "role (an ipc client running as the daemon's user, or a Curve key listed in "
                "its --curve-admins)",
                error_kind="permission",
            )
        try:
            return UtilityReply(call_id=call.call_id, result=self._run(client, call))
        except WorkerDiedError:
            raise  # the engine is broken: every client hears of it, not only this caller
        except Exception as e:
            return UtilityReply(call_id=call.call_id, error=f"{type(e).__name__}: {e}")

    def _run(self, client: bytes, call: UtilityCall) -> Any:
        engine = self.engine
        if call.method in ENGINE_METHODS:
            return getattr(engine, call.method)(*call.args)
        if call.method == "get_stats":
            return self.stats()
        if call.method == "check_health":
            engine.executor.check_health()
            engine.executor.ping(min(HEALTH_PING_TIMEOUT_S, engine.engine_args.step_timeout))
            return True
        if call.method == "collective_rpc":
            method, args, kwargs = call.args
            check_user_rpc(method, args, kwargs)
            return engine.executor.collective_rpc(method, *args, kwargs=kwargs)
        if call.method == "get_model_files":
            return self.model_files
        logger.info("client %s asked engine-core to shut down", client.hex()[:8])
        self.stop("a shutdown call")
        return True
