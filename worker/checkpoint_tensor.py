"""One tensor of a checkpoint, not read yet: a tensor-parallel rank reads only its slice.

safetensors' `get_slice` reads a slice straight from the mmap'd file, so a rank copies its
shard, never the whole tensor, to the device. Random weights (`load_format="dummy"`) are
drawn whole on the device and sliced there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CheckpointTensor:
    def __init__(
        self,
        shape: tuple[int, ...],
        read: Callable[[tuple[slice, ...]], torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.shape = tuple(shape)
        self._read = read
        self.device = device
        self.dtype = dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> CheckpointTensor:
        """A tensor already in memory (random weights, tests)."""
        return cls(tuple(tensor.shape), tensor.__getitem__, tensor.device, tensor.dtype)

    @classmethod
    def from_safetensors(
        cls, file, name: str, device: torch.device, dtype: torch.dtype
    ) -> CheckpointTensor:
        """`file`: an open `safetensors.safe_open`; the slice is read when asked for."""
        lazy = file.get_slice(name)
        return cls(tuple(lazy.get_shape()), lazy.__getitem__, device, dtype)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, start + length), on the device; a slice
        that runs past the end is cut there."""
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, min(start + length, self.shape[dim]))
        return self._to_device(self._read(tuple(index)))

    def full(self) -> torch.Tensor:
        return self._to_device(self._read(tuple(slice(None) for _ in self.shape)))

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)
