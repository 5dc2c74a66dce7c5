"""Greedy sampling: the index of each row's largest logit (the first one on ties, as torch)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zllm.worker.kernels.common import block, check_last_dim_contiguous


@triton.jit
def _argmax_kernel(X, Out, stride_x, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    best_value = tl.full([], float("-inf"), tl.float32)
    best_index = tl.full([], 0, tl.int32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        value = tl.max(x, 0)
        index = v0 + tl.argmax(x, 0, tie_break_left=True)
        better = value > best_value
        best_index = tl.where(better, index, best_index)
        best_value = tl.where(better, value, best_value)
    tl.store(Out + row, best_index.to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits: [S, V] -> [S] int64."""
    check_last_dim_contiguous(logits)
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    _argmax_kernel[(num_rows,)](
        logits, out, logits.stride(0), vocab, BLOCK=min(block(vocab), 4096), num_warps=8
    )
    return out
