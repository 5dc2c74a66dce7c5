"""Host <-> device copies that never make the host wait for the device.

Per-step inputs go up pinned and non-blocking (the caching host allocator keeps each pinned
buffer alive until its copy ran); results come down non-blocking and are read only after the
step's one synchronizing copy (the sampled ids).
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new tensor on `device` (on the CPU too: the caller may keep changing `values`)."""
    if isinstance(values, np.ndarray):
        if device.type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(values)).to(dtype, copy=True)
        return _pinned(values, dtype).to(device, non_blocking=True)
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def copy_into(dst: torch.Tensor, values: np.ndarray) -> None:
    """`dst[:] = values` for a persistent device buffer: one pinned staging tensor, one copy,
    no new device tensor."""
    if dst.device.type == "cpu":
        dst.copy_(torch.from_numpy(np.ascontiguousarray(values)))
        return
    dst.copy_(_pinned(values, dst.dtype), non_blocking=True)


def _pinned(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A pinned copy of `values` (filled through numpy: no torch op to dispatch)."""
    host = torch.empty(values.shape, dtype=dtype, pin_memory=True)
    host.numpy()[...] = values
    return host


def to_host(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    return tuple(t.to("cpu", non_blocking=True) for t in tensors)
