"""The clients engine-core knows, and when it last heard from each.

A client is known from its `Hello` (the main thread adds it) until its `Goodbye` or until it
is silent for `client_timeout` seconds; every frame it sends counts, and a client with
nothing to say sends `Heartbeat`s. The input thread, which reads most frames, also finds
the silent ones (`expire`: from then on their frames are not theirs any more), and the main
thread aborts their requests and removes them.

Silence is measured on engine-core's own clock of listening: if the input thread itself
could not run for a while (the process was stopped, the VM paused, the machine starved),
that time is not held against the clients, who could not be heard during it. Otherwise a
daemon resumed after a 5 s SIGSTOP would drop every client it has.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

STALL_S = 1.0  # a gap this long between two checks means we were not listening


@dataclass
class ClientInfo:
    name: str
    last_seen: float
    expired: bool = False  # silent too long; removed once its requests are aborted


class ClientRegistry:
    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._clients: dict[bytes, ClientInfo] = {}
        self._lock = threading.Lock()
        self._last_check = time.monotonic()

    def add(self, identity: bytes, name: str) -> None:
        with self._lock:
            self._clients[identity] = ClientInfo(name, time.monotonic())

    def remove(self, identity: bytes) -> bool:
        with self._lock:
            return self._clients.pop(identity, None) is not None

    def touch(self, identity: bytes) -> bool:
        """Note a frame from this client; False if it is not (or no longer) known."""
        with self._lock:
            info = self._clients.get(identity)
            if info is None or info.expired:
                return False
            info.last_seen = time.monotonic()
            return True

    def expire(self) -> list[tuple[bytes, ClientInfo]]:
        """Mark and return the clients newly silent for longer than the timeout."""
        now = time.monotonic()
        with self._lock:
            gap, self._last_check = now - self._last_check, now
            if gap > STALL_S:  # we were not listening: that time does not count
                for info in self._clients.values():
                    info.last_seen += gap
            if self.timeout_s is None:
                return []
            gone = [
                (identity, info)
                for identity, info in self._clients.items()
                if not info.expired and now - info.last_seen > self.timeout_s
            ]
            for _, info in gone:
                info.expired = True
            return gone

    def __len__(self) -> int:
        return len(self._clients)

    def identities(self) -> list[bytes]:
        with self._lock:
            return list(self._clients)
