"""What the engine owes a client: its running requests and its pending utility calls.

A caller's request id maps to one engine request (n = 1, or a pooling request) or to n of
them (`n > 1`, children sharing one stream). Each engine request has its own engine id (the
caller's or child's id plus a random suffix), so a caller may reuse an id the moment its
request ends without ever receiving the old request's late tokens.

One lock guards the maps, held only for dictionary work: detokenization and output happen
outside it (`output_delivery.py`), so submitting or aborting never waits for a step's text.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zllm.frontend.stream import RequestStream


@dataclass
class EngineRequest:
    """One request the engine runs for us."""

    request_id: str  # the caller's
    engine_id: str  # the engine's: the (child's) id plus a suffix
    state: Any  # a `RequestState`, `ChildHandle` or `PoolingRequestState`: has `lock`
    stream: RequestStream  # shared by the n children of a request
    submitted: float = field(default_factory=time.monotonic)


class RequestRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_engine_id: dict[str, EngineRequest] = {}
        self._by_request_id: dict[str, list[str]] = {}  # caller's id -> engine ids
        self._calls: dict[int, tuple[concurrent.futures.Future, float]] = {}

    # ---- requests ----------------------------------------------------------------------------

    def add(self, entries: list[EngineRequest], admit: Callable[[], None]) -> None:
        """Register one caller request's engine requests. `admit` runs under the lock and may
        raise (the client is gone): `fail_all` takes the same lock, so a request is either
        refused here or failed there, never forgotten in between."""
        request_id = entries[0].request_id
        with self._lock:
            admit()
            if request_id in self._by_request_id:
                raise ValueError(
                    f"request id {request_id!r} is already in use by a running request"
                )
            self._by_request_id[request_id] = [e.engine_id for e in entries]
            for entry in entries:
                self._by_engine_id[entry.engine_id] = entry

    def get(self, engine_id: str) -> EngineRequest | None:
        with self._lock:
            return self._by_engine_id.get(engine_id)

    def __contains__(self, request_id: str) -> bool:
        """Whether a caller's request is still running."""
        with self._lock:
            return request_id in self._by_request_id

    def forget(self, entry: EngineRequest) -> None:
        """Drop one finished engine request (its siblings may run on)."""
        with self._lock:
            self._by_engine_id.pop(entry.engine_id, None)
            siblings = self._by_request_id.get(entry.request_id)
            if siblings is not None and entry.engine_id in siblings:
                siblings.remove(entry.engine_id)
                if not siblings:
                    del self._by_request_id[entry.request_id]

    def forget_request(self, request_id: str) -> list[EngineRequest]:
        """Drop every engine request of a caller's request; return those that were running."""
        with self._lock:
            engine_ids = self._by_request_id.pop(request_id, [])
            return [e for eid in engine_ids if (e := self._by_engine_id.pop(eid, None))]

    # ---- utility calls -----------------------------------------------------------------------

    def add_call(self, call_id: int, future: concurrent.futures.Future, admit: Callable) -> None:
        with self._lock:
            admit()
            self._calls[call_id] = (future, time.monotonic())

    def pop_call(self, call_id: int) -> concurrent.futures.Future | None:
        with self._lock:
            entry = self._calls.pop(call_id, None)
        return entry[0] if entry is not None else None

    def has_call(self, call_id: int) -> bool:
        with self._lock:
            return call_id in self._calls

    # ---- everything at once --------------------------------------------------------------------

    def pop_all(
        self, submitted_before: float | None = None
    ) -> tuple[list[EngineRequest], list[concurrent.futures.Future]]:
        """Drop every request and call, or those submitted before a (monotonic) time."""
        with self._lock:
            if submitted_before is None:
                entries = list(self._by_engine_id.values())
                calls = [future for future, _ in self._calls.values()]
                self._by_engine_id.clear()
                self._by_request_id.clear()
                self._calls.clear()
                return entries, calls
            old = {
                e.request_id for e in self._by_engine_id.values() if e.submitted < submitted_before
            }
            entries = [
                entry
                for request_id in old
                for engine_id in self._by_request_id.pop(request_id, [])
                if (entry := self._by_engine_id.pop(engine_id, None)) is not None
            ]
            old_calls = [cid for cid, (_, t) in self._calls.items() if t < submitted_before]
            return entries, [self._calls.pop(cid)[0] for cid in old_calls]
