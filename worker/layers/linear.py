"""Linear layers split across tensor-parallel ranks.

Column-parallel layers keep a slice of the output features (no communication); row-parallel
layers keep a slice of the input features and all-reduce their partial sums. Each
parameter knows how to take its slice of a full checkpoint tensor (`weight_loader`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) for this rank's slice of several stacked outputs (e.g. q, k, v).

    `output_sizes` are the full sizes of the stacked parts; each is split evenly across ranks.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__()
        size = tp_size()
        for out in output_sizes:
            if out % size:
                raise ValueError(
                    f"output size {out} is not divisible by tensor_parallel_size={size}"
                )
        self.local_sizes = [out // size for out in output_sizes]
        self.weight = nn.Parameter(
            torch.empty(sum(self.local_sizes), input_size), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(sum(self.local_sizes)), requires_grad=False) if bias else None
        )

    def load(self, param: nn.Parameter, full: torch.Tensor, part: int) -> None:
        local = self.local_sizes[part]
        offset = sum(self.local_sizes[:part])
        shard = full.narrow(0, tp_rank() * local, local)
        param.data.narrow(0, offset, local).copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_slice W_slice^T (+ b, added once, after the sum)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        size = tp_size()
        if input_size % size:
            raise ValueError(
                f"input size {input_size} is not divisible by tensor_parallel_size={size}"
            )
        self.local_input = input_size // size
        self.weight = nn.Parameter(torch.empty(output_size, self.local_input), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def load(self, param: nn.Parameter, full: torch.Tensor, part: int = 0) -> None:
        if param is self.bias:  # every rank keeps the whole bias
            param.data.copy_(full)
        else:
            param.data.copy_(full.narrow(1, tp_rank() * self.local_input, self.local_input))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight)
        if tp_size() > 1:
            dist.all_reduce(y)
        return y if self.bias is None else y + self.bias
