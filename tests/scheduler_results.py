"""Applying a step's results to a `Scheduler` alone, as `EngineCore._apply` does in the pass
that also builds the clients' updates (scheduler tests run without an engine)."""

from __future__ import annotations

from zllm.core.request import Request, RequestStatus
from zllm.core.scheduler import ScheduledStep, Scheduler


def apply_results(sched: Scheduler, step: ScheduledStep, sampled: dict[str, int]) -> list[Request]:
    """Take a step's results (`sampled`: key -> token); return the requests that finished.
    A request finished meanwhile (aborted, or ended by an earlier step while this one was in
    flight) takes nothing; one preempted meanwhile keeps its token."""
    finished = []
    for request, ends in zip(step.requests, step.ends_tokens):
        if ends and request.status is not RequestStatus.FINISHED:
            if sched.take_result(request, sampled.get(request.key)):
                finished.append(request)
    return finished
