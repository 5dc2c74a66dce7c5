"""Stopping gracefully (SIGTERM, or an admin's "shutdown" call): admit nothing new, let the
requests in flight finish for `drain_timeout`, abort the rest with "engine shutting down"."""

from __future__ import annotations

import logging
import time

from zllm.core.client_frames import FrameReader
from zllm.core.engine_core import EngineCore
from zllm.core.systemd_notify import SystemdNotifier
from zllm.protocol.messages import RequestUpdate

logger = logging.getLogger("zllm.core")


class Drain:
    def __init__(
        self,
        engine: EngineCore,
        reason: str,
        timeout_s: float,
        reader: FrameReader,
        notifier: SystemdNotifier,
    ) -> None:
        self.engine = engine
        self.reason = reason
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.refusal = f"engine-core is shutting down ({reason})"
        reader.refusing = self.refusal  # the socket threads refuse every new request now
        in_flight = len(engine.scheduler.requests)
        logger.info(
            "engine-core draining (%s): %d request(s) in flight, %g s to finish",
            reason,
            in_flight,
            timeout_s,
        )
        notifier.stopping(f"draining ({reason}): {in_flight} requests in flight")

    def refused(self, request_id: str) -> RequestUpdate:
        """The answer to a request that arrives while draining."""
        return RequestUpdate.refused(request_id, self.refusal, "shutdown")

    def done(self) -> tuple[bool, list[tuple[bytes, RequestUpdate]]]:
        """(whether the drain is over, the updates of the requests it aborted now)."""
        requests = list(self.engine.scheduler.requests.values())
        if not requests:
            return True, []
        if time.monotonic() < self.deadline:
            return False, []
        error = (
            f"engine shutting down ({self.reason}): the request did not finish within the "
            f"drain timeout ({self.timeout_s:g} s)"
        )
        self.engine.abort([r.key for r in requests])
        logger.info("engine-core aborted %d request(s) still running", len(requests))
        return True, [
            (
                r.client,
                RequestUpdate(
                    request_id=r.request_id,
                    new_token_ids=[],
                    finish_reason="abort",
                    error=error,
                    error_kind="shutdown",
                ),
            )
            for r in requests
        ]
