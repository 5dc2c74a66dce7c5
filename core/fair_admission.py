"""The order in which waiting requests are admitted when several clients share an engine.

First come, first served lets one client that queues a thousand requests starve a client
that queues one. Here each client's requests keep their own order, and clients take turns:
the k-th waiting request of every client comes before the (k+1)-th of any, and among equal
turns the client served least recently goes first. Preempted requests (they held blocks and
will again) go before all. With a single client this is plain arrival order.

This decides order only, among requests of equal priority: under the priority policy the
lowest `priority` level goes first, and clients take turns within each level.
"""

from __future__ import annotations

from collections.abc import Iterable

from zllm.core.request import Request, RequestStatus


class ClientRoundRobin:
    def __init__(self) -> None:
        self._turn = 0
        self._last_served: dict[bytes, int] = {}  # client -> turn of its last admission

    def order(self, waiting: Iterable[Request], by_priority: bool = False) -> list[Request]:
        """`waiting` (in the queue's order: arrival, preempted first; or priority, then
        arrival) in the order to admit them."""
        waiting = list(waiting)
        if len({r.client for r in waiting}) <= 1:
            return waiting
        seen: dict[tuple[int, bytes], int] = {}
        keyed = []
        for position, request in enumerate(waiting):
            level = request.priority if by_priority else 0
            if request.status is RequestStatus.PREEMPTED:
                keyed.append(((level, -1, -1, position), request))
                continue
            rank = seen.get((level, request.client), 0)
            seen[level, request.client] = rank + 1
            last = self._last_served.get(request.client, -1)
            keyed.append(((level, rank, last, position), request))
        keyed.sort(key=lambda item: item[0])
        return [request for _, request in keyed]

    def admitted(self, request: Request) -> None:
        self._turn += 1
        self._last_served[request.client] = self._turn

    def forget(self, client: bytes) -> None:
        """The client left: its turn is history."""
        self._last_served.pop(client, None)
