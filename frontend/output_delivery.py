"""Folding the engine's updates into request states and streams (the client's I/O thread).

Each update is handled under its own request's lock only (`state.lock`; the n children of a
request share their parent's): detokenizing and stop strings happen there, and so does
queueing the request's state in its stream (`RequestStream.put_pending`, once until the
consumer takes it). The consumer shapes the output when it takes it, under the same lock:
a slow consumer gets one output with everything new, not one per step, and nobody copies
a CUMULATIVE output that is never read. An `abort` from another thread takes the same lock
to put the last output, so it can never come before, or be followed by, an output of an
update. The registry's lock is taken only to look entries up or drop them, so submission
never waits for a step's detokenization.
"""

from __future__ import annotations

import logging
import time

from zllm.frontend.errors import EngineDeadError, EngineOverloadedError
from zllm.frontend.request_registry import EngineRequest, RequestRegistry
from zllm.frontend.stream import ConsumerGone
from zllm.protocol.messages import RequestUpdate

logger = logging.getLogger("zllm.frontend")

# `RequestUpdate.error_kind` -> what the caller's stream raises.
ERROR_TYPES: dict[str | None, type[Exception]] = {
    "invalid": ValueError,
    "overloaded": EngineOverloadedError,
    "shutdown": EngineDeadError,
}


def deliver(registry: RequestRegistry, updates: list[RequestUpdate], now: float) -> list[str]:
    """Hand one step's updates on; return the engine ids to abort in the engine (a stop
    string matched, a sibling failed, or nobody reads the stream any more)."""
    to_abort: list[str] = []
    for update in updates:
        entry = registry.get(update.request_id)
        if entry is not None:  # else: aborted or failed meanwhile
            to_abort += _deliver_one(registry, entry, update, now)
    return to_abort


def _deliver_one(
    registry: RequestRegistry, entry: EngineRequest, update: RequestUpdate, now: float
) -> list[str]:
    if update.error is not None:  # refused by the engine: the whole request fails
        siblings = registry.forget_request(entry.request_id)
        if siblings:
            error = ERROR_TYPES.get(update.error_kind, ValueError)(update.error)
            with entry.state.lock:
                entry.stream.put_final(error)
        return [other.engine_id for other in siblings if other is not entry]
    with entry.state.lock:
        try:
            stopped_by_string = entry.state.apply(update, now)
        except Exception as e:  # one request's failure (detokenizing) ends that request only
            logger.exception("could not process output of request %s", entry.request_id)
            gone = registry.forget_request(entry.request_id)
            entry.stream.put_final(e)
            return [other.engine_id for other in gone]
        finished = entry.state.finished
        if finished:
            registry.forget(entry)
        # A prompt-logprobs chunk alone (no token yet) shows nothing new to the caller, nor
        # does a token of a request that shows only its end (FINAL_ONLY, pooling).
        if finished or (update.new_token_ids and entry.state.streams):
            try:  # built when the consumer takes it: one output however many steps it lags
                entry.stream.put_pending(entry.state)
            except ConsumerGone:  # its loop is closed: nobody will read it, stop it
                gone = registry.forget_request(entry.request_id)
                return [other.engine_id for other in gone if not other.state.finished]
    return [entry.engine_id] if stopped_by_string else []


def finish_aborted(entries: list[EngineRequest], now: float | None = None) -> None:
    """Give each aborted request's stream its last output, `finish_reason="abort"` (as vLLM),
    so a consumer waiting on it returns instead of hanging: every state first, then one
    output per stream (the n children of a request share one)."""
    now = now or time.time()
    by_stream: dict[int, EngineRequest] = {}
    for entry in entries:
        with entry.state.lock:
            entry.state.abort(now)
        by_stream[id(entry.stream)] = entry
    for entry in by_stream.values():
        with entry.state.lock:
            output = entry.state.output()  # None if the I/O thread sent the last one already
            if output is not None:
                entry.stream.put_final(output)


def fail(entries: list[EngineRequest], message: str) -> None:
    """End each stream with `EngineDeadError(message)` (one instance each: its own traceback)."""
    for entry in entries:
        with entry.state.lock:
            entry.stream.put_final(EngineDeadError(message))
