"""A per-request output queue that belongs to no event loop.

The client's I/O thread puts outputs in; a consumer takes them out from whichever event
loop (or plain thread) it runs in *at that moment*. Nothing is bound to a loop when the
request starts, so a second `asyncio.run()`, another thread's loop, or uvloop all work.
If the loop that consumed the stream is closed, nobody can read it any more: `put` tells
the I/O thread (`ConsumerGone`) so the request is aborted instead of running on.

A streaming request's outputs are not queued one per step: `put_pending` queues its state
once, and the consumer builds the output when it takes it (as vLLM's output collector
merges them). A consumer that lags behind the engine wakes once and gets everything new
(DELTA: all the pieces in one; CUMULATIVE: the latest), so the queue never grows with
the engine's steps and no full copy is made for an output nobody reads.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from typing import Any, Protocol


class ConsumerGone(Exception):
    """The loop that was reading this stream is closed: nobody will read it again."""


class OutputSource(Protocol):
    """A request's state: `output()` is what is new since its last output (None: nothing)."""

    lock: Any  # one per request: the n children of a request share their parent's

    def output(self) -> Any: ...


class _Pending:
    """A queued source, built into its output when the consumer takes it."""

    __slots__ = ("source",)

    def __init__(self, source: OutputSource) -> None:
        self.source = source


class RequestStream:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._items: deque[Any] = deque()
        self._pending: set[Any] = set()  # the locks of the sources queued in `_items`
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        # The loop that last read: weak, so a stream never keeps a dead loop alive.
        self._last_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

    def put(self, item: Any) -> None:
        """Called from the I/O thread. Raises `ConsumerGone` if the reading loop was closed.

        The item is queued either way, so a reader that does come back still sees it.
        """
        self._put(item, None)

    def put_pending(self, source: OutputSource) -> None:
        """`source` has something new: queue it unless it is queued already (its output,
        built when taken, will hold this too). Called with `source.lock` held; raises
        `ConsumerGone` as `put`."""
        self._put(_Pending(source), source.lock)

    def put_final(self, item: Any) -> None:
        """Queue a last item (an abort output, an error); unlike `put`, never raises: for
        when the consumer is gone or is the one ending the request. It comes after any
        queued source, never merged into it."""
        try:
            self.put(item)
        except ConsumerGone:
            pass

    def _put(self, item: Any, pending: Any) -> None:
        """`pending`: the lock of the source `item` stands for (queued once), or None."""
        with self._lock:
            if pending is None or pending not in self._pending:
                if pending is not None:
                    self._pending.add(pending)
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

    async def get(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                self._last_loop = weakref.ref(loop)
                head = self._items[0] if self._items else None
                if head is None:
                    future = loop.create_future()
                    self._waiter = (loop, future)
                elif not isinstance(head, _Pending):
                    return self._items.popleft()
            if head is not None:
                item = self._build(head)
                if item is not None:
                    return item
                continue
            try:
                await future
            finally:
                with self._lock:
                    if self._waiter is not None and self._waiter[1] is future:
                        self._waiter = None

    def get_blocking(self, timeout: float | None = None) -> Any:
        """For plain threads (`LLM`): wait on a condition variable, not on any loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._ready.wait_for(lambda: self._items, left):
                    raise TimeoutError
                head = self._items[0]
                if not isinstance(head, _Pending):
                    return self._items.popleft()
            item = self._build(head)
            if item is not None:
                return item

    def _build(self, head: _Pending) -> Any | None:
        """Unqueue `head` and build its output, both under the source's lock (taken before
        the stream's, as the I/O thread does): no update can be folded in between, so a
        source queued again always has something this output did not show. None if there
        is nothing to show (the last output went out) or another reader took `head`."""
        source = head.source
        with source.lock:
            with self._lock:
                if not self._items or self._items[0] is not head:
                    return None
                self._items.popleft()
                self._pending.discard(source.lock)
            return source.output()


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
