"""A per-request output queue that belongs to no event loop.

The client's I/O thread puts outputs in; a consumer takes them out from whichever event
loop (or plain thread) it runs in *at that moment*. Nothing is bound to a loop when the
request starts, so a second `asyncio.run()`, another thread's loop, or uvloop all work.
If the loop that consumed the stream is closed, nobody can read it any more: `put` tells
the I/O thread (`ConsumerGone`) so the request is aborted instead of running on.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from typing import Any


class ConsumerGone(Exception):
    """The loop that was reading this stream is closed: nobody will read it again."""


class RequestStream:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._items: deque[Any] = deque()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        # The loop that last read: weak, so a stream never keeps a dead loop alive.
        self._last_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

    def put(self, item: Any) -> None:
        """Called from the I/O thread. Raises `ConsumerGone` if the reading loop was closed.

        The item is queued either way, so a reader that does come back still sees it.
        """
        with self._lock:
            self._items.append(item)
            self._ready.notify_all()
            waiter, self._waiter = self._waiter, None
            last = self._last_loop() if self._last_loop is not None else None
        if waiter is not None:
            loop, future = waiter
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError as e:  # the loop is closed
                raise ConsumerGone from e
        elif last is not None and last.is_closed():
            raise ConsumerGone

    def put_final(self, item: Any) -> None:
        """Queue a last item (an abort output, an error); unlike `put`, never raises: for
        when the consumer is gone or is the one ending the request."""
        try:
            self.put(item)
        except ConsumerGone:
            pass

    async def get(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                self._last_loop = weakref.ref(loop)
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
        """For plain threads (`LLM`): wait on a condition variable, not on any loop."""
        with self._lock:
            if not self._ready.wait_for(lambda: self._items, timeout):
                raise TimeoutError
            return self._items.popleft()


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
