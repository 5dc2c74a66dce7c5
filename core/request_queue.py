"""The order in which waiting requests are admitted, and which running request is preempted.

`scheduling_policy` (vLLM's names): "fcfs" admits in arrival order and preempts the most
recently admitted request; "priority" admits the lowest `priority` value first (vLLM's
convention), ties in arrival order, and preempts the running request with the highest
(priority, arrival) first. Ties never reorder, so equal-priority requests are never starved by
each other. The scheduler only calls the methods below, so another order (per-client fairness,
say) is one more class here.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import Counter, deque
from collections.abc import Iterator

from zllm.core.request import Request
from zllm.protocol.config import SCHEDULING_POLICIES


class _ClientCounts:
    """Waiting requests per client, so the scheduler knows in O(1) whether clients must take
    turns (`fair_admission.py`), not by scanning thousands of waiting requests every step."""

    def __init__(self) -> None:
        self._counts: Counter[bytes] = Counter()

    def add(self, request: Request) -> None:
        self._counts[request.client] += 1

    def remove(self, request: Request) -> None:
        self._counts[request.client] -= 1
        if not self._counts[request.client]:
            del self._counts[request.client]

    def __len__(self) -> int:
        return len(self._counts)


class FCFSRequestQueue:
    """Arrival order; a preempted request goes back to the front."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()
        self._clients = _ClientCounts()

    @property
    def num_clients(self) -> int:
        """Clients with a waiting request."""
        return len(self._clients)

    def add_request(self, request: Request) -> None:
        self._queue.append(request)
        self._clients.add(request)

    def prepend_request(self, request: Request) -> None:
        self._queue.appendleft(request)
        self._clients.add(request)

    def peek_request(self) -> Request:
        return self._queue[0]

    def pop_request(self) -> Request:
        request = self._queue.popleft()
        self._clients.remove(request)
        return request

    def remove_request(self, request: Request) -> None:
        self._queue.remove(request)
        self._clients.remove(request)

    @staticmethod
    def add_running(running: list[Request], request: Request) -> None:
        """Admission order: the last admitted is the first preempted."""
        running.append(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityRequestQueue:
    """Lowest (priority, arrival) first, preempted requests included: they keep their place."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Request]] = []
        self._arrivals = itertools.count()
        self._clients = _ClientCounts()

    @property
    def num_clients(self) -> int:
        """Clients with a waiting request."""
        return len(self._clients)

    def _key(self, request: Request) -> tuple[int, int]:
        if request.arrival_order < 0:
            request.arrival_order = next(self._arrivals)
        return request.priority, request.arrival_order

    def add_request(self, request: Request) -> None:
        heapq.heappush(self._heap, (*self._key(request), request))
        self._clients.add(request)

    prepend_request = add_request

    def peek_request(self) -> Request:
        return self._heap[0][2]

    def pop_request(self) -> Request:
        request = heapq.heappop(self._heap)[2]
        self._clients.remove(request)
        return request

    def remove_request(self, request: Request) -> None:
        before = len(self._heap)
        self._heap = [entry for entry in self._heap if entry[2] is not request]
        heapq.heapify(self._heap)
        if len(self._heap) < before:
            self._clients.remove(request)

    def add_running(self, running: list[Request], request: Request) -> None:
        """Kept sorted by (priority, arrival): the scheduler serves running requests from the
        front and preempts from the back, so the least urgent request is the victim."""
        bisect.insort(running, request, key=self._key)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[2] for entry in sorted(self._heap, key=lambda e: e[:2]))


def create_request_queue(policy: str) -> FCFSRequestQueue | PriorityRequestQueue:
    if policy == "fcfs":
        return FCFSRequestQueue()
    if policy == "priority":
        return PriorityRequestQueue()
    raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {policy!r}")
