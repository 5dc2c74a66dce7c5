"""What the client tracks for one pooling request until its vector arrives (I/O thread).

The same duck type as `output_processor.RequestState` (`apply`, `output`, `abort`,
`finished`, `metrics`), so the client delivers, aborts and fails both alike. A pooling
request has one output: the finished vector. An aborted one has none: its stream ends with
`ABORTED`, and `encode()` returns without yielding.
"""

from __future__ import annotations

import threading
import time

from zllm.frontend.outputs import RequestMetrics
from zllm.frontend.pooling_outputs import PoolingOutput, PoolingRequestOutput
from zllm.protocol.messages import RequestUpdate


class _Aborted:
    """The last item of an aborted pooling request's stream."""

    finished = True

    def __repr__(self) -> str:
        return "ABORTED"


ABORTED = _Aborted()


class PoolingRequestState:
    def __init__(
        self, request_id: str, prompt_token_ids: list[int], arrival_time: float | None = None
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.lock = threading.RLock()  # held by the client around apply/output
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        self.finish_reason: str | None = None
        self.pooled: bytes | None = None
        self.num_cached_tokens = 0
        self.emitted = False

    @property
    def streams(self) -> bool:
        """A pooled vector is shown once, at the end: its consumer is not woken before."""
        return False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, update: RequestUpdate, now: float) -> bool:
        """Take the engine's vector; never asks for an abort (no stop strings here)."""
        with self.lock:
            if not self.finished and update.finish_reason is not None:
                self.finish_reason = update.finish_reason
                self.pooled = update.pooled
                self.num_cached_tokens = update.num_cached_tokens
                self.metrics.first_token_time = self.metrics.finished_time = now
                self.metrics.time_in_queue = update.queue_time
            return False

    def abort(self, now: float) -> None:
        with self.lock:
            if not self.finished:
                self.finish_reason = "abort"
                self.metrics.finished_time = now

    def output(self) -> PoolingRequestOutput | _Aborted | None:
        with self.lock:
            if not self.finished or self.emitted:
                return None
            self.emitted = True
            if self.pooled is None:
                return ABORTED
            import torch  # here, not at import: `import zllm` stays free of torch

            data = torch.frombuffer(bytearray(self.pooled), dtype=torch.float32)
            return PoolingRequestOutput(
                request_id=self.request_id,
                outputs=PoolingOutput(data=data),
                prompt_token_ids=self.prompt_token_ids,
                finished=True,
                num_cached_tokens=self.num_cached_tokens,
                metrics=self.metrics,
            )
