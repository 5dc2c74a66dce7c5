"""The garbage collector during one `LLM` batch call: the heap that was there before it is
left out of the collector's scans until the call returns.

A batch of 10,000 prompts makes some 200,000 Python objects that live until it ends (its
requests, streams, outputs), which sets off several full collections; each one scans the
whole heap, and the frontend's heap holds torch and transformers (~200,000 objects): about a
tenth of an `embed` of 10,000 short sentences went there. `gc.freeze()` moves what exists
to the permanent generation in O(1); `gc.unfreeze()` puts it back when the call ends, so
nothing is kept from the collector for longer than the call (vLLM freezes its processes'
start-up heaps for good; this is the user's process, so only for the call).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the heap for the duration of the block, unless the process manages it already
    (its own `gc.freeze()`, the collector disabled, or another batch call holding it)."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
