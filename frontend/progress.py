"""The progress bar of `LLM.generate(use_tqdm=...)`: True for tqdm's bar on stderr, a tqdm-like
class to build another, False for none."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(use_tqdm: bool | Callable[..., Any], total: int, desc: str) -> Iterator[Any]:
    if not use_tqdm:
        yield _NoBar()
        return
    if use_tqdm is True:
        from tqdm import tqdm as use_tqdm
    bar = use_tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
