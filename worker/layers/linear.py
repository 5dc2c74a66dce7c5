"""Layers split across tensor-parallel ranks.

Column-parallel layers keep a slice of the output features (no communication); row-parallel
layers keep a slice of the input features and all-reduce their partial sums. The embedding
and the LM head are split over the vocabulary: each rank embeds the ids of its rows (zeros
elsewhere, summed by an all-reduce) and computes the logits of its rows, gathered on rank 0,
which samples. Each layer reads only its own slice of a checkpoint tensor (`load`).

With `fused=True` (the Triton kernels) a single half-precision row on a GPU, a batch-1
decode step, is multiplied by `worker/kernels/gemv.py` instead of cuBLAS (`project`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from zllm.worker.checkpoint_tensor import CheckpointTensor


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


_GEMV_DTYPES = (torch.bfloat16, torch.float16)


def project(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fused: bool
) -> torch.Tensor:
    """x W^T (+ b). A fused single half-precision row on a GPU goes through the Triton GEMV,
    which reads the weight closer to the memory's speed than cuBLAS does at batch 1; float32
    keeps cuBLAS (the exact path parity is checked on)."""
    if fused and x.shape[0] == 1 and x.is_cuda and x.dtype in _GEMV_DTYPES:
        from zllm.worker.kernels.gemv import gemv

        return gemv(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) for this rank's slice of several stacked outputs (e.g. q, k, v).

    `output_sizes` are the full sizes of the stacked parts; each is split evenly across ranks.
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool, fused: bool = False
    ) -> None:
        super().__init__()
        self.fused = fused
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

    def load(self, param: nn.Parameter, full: CheckpointTensor, part: int) -> None:
        local = self.local_sizes[part]
        offset = sum(self.local_sizes[:part])
        shard = full.narrow(0, tp_rank() * local, local)
        param.data.narrow(0, offset, local).copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias, self.fused)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_slice W_slice^T (+ b, added once, after the sum)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, fused: bool = False
    ) -> None:
        super().__init__()
        self.fused = fused
        size = tp_size()
        if input_size % size:
            raise ValueError(
                f"input size {input_size} is not divisible by tensor_parallel_size={size}"
            )
        self.local_input = input_size // size
        self.weight = nn.Parameter(torch.empty(output_size, self.local_input), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def load(self, param: nn.Parameter, full: CheckpointTensor, part: int = 0) -> None:
        if param is self.bias:  # every rank keeps the whole bias
            param.data.copy_(full.full())
        else:
            param.data.copy_(full.narrow(1, tp_rank() * self.local_input, self.local_input))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = project(x, self.weight, None, self.fused)
        if tp_size() > 1:
            dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows are split evenly over the ranks (the last one padded)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp_size())  # this rank's rows, padding included
        self.first = tp_rank() * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)

    def load(self, param: nn.Parameter, full: CheckpointTensor, part: int = 0) -> None:
        if full.shape[0] != self.vocab_size:
            raise ValueError(f"vocabulary of {full.shape[0]} rows, expected {self.vocab_size}")
        shard = full.narrow(0, self.first, self.rows)
        param.data[: shard.shape[0]].copy_(shard)
        param.data[shard.shape[0] :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.rows)
        x = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(x)
        return x


class ParallelLMHead(VocabParallelEmbedding):
    """An untied LM head: the embedding's row split, never looked up. The model multiplies
    the hidden states by this rank's rows and `gather_vocab` joins the logits."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise TypeError("an LM head is not an embedding: use gather_vocab on its logits")


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def vocab_logits(hidden: torch.Tensor, weight: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """`hidden @ weight.T` for this rank's vocabulary rows. On the CPU in float32 through
    oneDNN, with the weight kept in oneDNN's own blocked layout: this wide, short matmul
    (e.g. [256, 256] x [256, 32000], most of a CPU decode step) then runs ~1.5x faster than
    the default BLAS path, and 2x at 16 rows; elsewhere `project`."""
    if hidden.device.type == "cpu" and hidden.dtype == weight.dtype == torch.float32 and _ONEDNN:
        packed = _onednn_layout(weight)
        return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), packed, None, "none", [], "")
    return project(hidden, weight, None, fused)


def _onednn_layout(weight: torch.Tensor) -> torch.Tensor:
    """`weight` reordered for oneDNN, kept on the weight itself (one copy of the LM head) and
    made again when the weight moves or changes in place (reloaded weights, wake-up)."""
    key = (weight.data_ptr(), weight._version)
    cached = getattr(weight, "_zllm_onednn", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        weight._zllm_onednn = cached
    return cached[1]


def gather_vocab(local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Each rank's `[rows, vocab / ranks]` logits, joined on rank 0 (None elsewhere)."""
    if tp_size() == 1:
        return local[:, :vocab_size]
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(tp_size())] if tp_rank() == 0 else None
    dist.gather(local, parts, dst=0)
    return torch.cat(parts, dim=1)[:, :vocab_size] if parts is not None else None
