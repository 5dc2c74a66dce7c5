"""Host <-> device copies that never make the host wait for the device.

Per-step inputs go up pinned and non-blocking (the caching host allocator keeps each pinned
buffer alive until its copy ran); results come down non-blocking and are read only after the
step's one synchronizing copy (the sampled ids).
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_host(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    return tuple(t.to("cpu", non_blocking=True) for t in tensors)
