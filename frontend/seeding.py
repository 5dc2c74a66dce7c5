"""`LLM(seed=N)` seeds the user's own `random`, `numpy` and `torch`, as vLLM's in-process
engine does (its reproducibility example prints `random.randint` to show it)."""

from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed % 2**32)
    import torch

    torch.manual_seed(seed)
