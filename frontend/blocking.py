"""Blocking calls (`LLM`, `LLMEngine`) from a thread that runs an event loop: Jupyter, IPython,
a sync function called from async code.

The client's sockets belong to its own I/O thread, so a blocking call waits on a condition
variable, never on the caller's loop: it works there, and blocks that loop meanwhile, as
vLLM's `LLM` does and as a notebook user expects. The first such call warns once. The one
place where waiting would deadlock is the client's I/O thread itself, which delivers the
results: there the call is refused.
"""

from __future__ import annotations

import asyncio
import threading
import warnings

_warned = False


def check_blocking_call(what: str, io_thread: threading.Thread | None) -> None:
    """Raise where `what` would wait on itself; warn once where it blocks a running loop."""
    global _warned
    if io_thread is not None and threading.current_thread() is io_thread:
        raise RuntimeError(
            f"{what} cannot be called from the engine client's I/O thread: it would wait for "
            "results that only this thread can deliver"
        )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    if not _warned:
        _warned = True
        warnings.warn(
            f"{what} blocks this thread's running event loop until it returns (fine in a "
            "notebook); in async code use AsyncLLM, or `await asyncio.to_thread(...)`",
            RuntimeWarning,
            stacklevel=3,
        )
