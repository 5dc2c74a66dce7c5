"""A per-request output queue that belongs to no event loop.

The client's I/O thread puts outputs in; a consumer takes them out from whichever event
loop (or plain thread) it runs in *at that moment*. Nothing is bound to a loop when the
request starts, so a second `asyncio.run()`, another thread's loop, or uvloop all work.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any


class ConsumerGone(Exception):
    """The loop that was waiting on this stream is closed: nobody will read it again."""


class RequestStream:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._items: deque[Any] = deque()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    def put(self, item: Any) -> None:
        """Called from the I/O thread. Raises `ConsumerGone` if the waiting loop was closed."""
        with self._lock:
            self._items.append(item)
            self._ready.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError as e:  # loop closed
                raise ConsumerGone from e

    async def get(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                future = loop.create_future()
                self._waiter = (loop, future)
            try:
                await future
            finally:
                with self._lock:
                    if self._waiter is not None and self._waiter[1] is future:
                        self._waiter = None

    def get_blocking(self, timeout: float | None = None) -> Any:
        with self._lock:
            if not self._ready.wait_for(lambda: self._items, timeout):
                raise TimeoutError
            return self._items.popleft()


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
