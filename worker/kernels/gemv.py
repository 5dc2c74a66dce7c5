"""y = x W^T (+ b) for one row of x: the matrix-vector product of a batch-1 decode step.

At batch 1 a decoder's step is bound by reading its weights once. cuBLAS picks tile shapes
made for matrices and, for the projections whose output is narrow (o_proj, down_proj, qkv),
splits K over thread blocks and reduces in a second kernel: it reads those weights at ~2.5
TB/s on an H100 where a copy reaches ~3.0. Here each program reads `BLOCK_N` whole rows of W
(contiguous, so coalesced) in `BLOCK_K` slices, accumulates elementwise products in float32
registers and sums them once at the end: one kernel, no reduction pass, enough programs to
fill the GPU for every projection of a 0.5B-8B model (N >= 896 rows).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from zllm.worker.kernels.common import check_last_dim_contiguous


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def config_for(n: int, k: int) -> GemvConfig:
    """Chosen from `bench/gemv_sweep.py` on an H100 (bench/RESULTS.md): 4 rows of 1024 a
    slice is within 2% of the best for every projection of Llama-3.1-8B and Qwen2.5-0.5B
    except wide outputs over a short K (Qwen's gate_up and LM head: K=896), where a 1024
    slice is mostly masked and 8 rows of 512 do better."""
    if k < 2048 and n > 8192:
        return GemvConfig(block_n=8, block_k=512, num_warps=4, num_stages=3)
    return GemvConfig(block_n=4, block_k=1024, num_warps=8, num_stages=4)


@triton.jit
def _gemv_kernel(
    X,
    W,
    B,
    Out,
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = W + tl.where(row_ok, rows, 0).to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(X + cols)
            w = tl.load(w_rows + cols[None, :])
        else:
            x = tl.load(X + cols, mask=cols < K, other=0.0)
            w = tl.load(w_rows + cols[None, :], mask=cols[None, :] < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Out + rows, y.to(Out.dtype.element_ty), mask=row_ok)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x: [1, K], weight: [N, K], bias: [N] or None -> [1, N] in x's dtype."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv takes one row, got x of shape {tuple(x.shape)}")
    check_last_dim_contiguous(x, weight)
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features, weight {k}")
    config = config or config_for(n, k)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x,
        weight,
        bias if bias is not None else out,
        out,
        n,
        k,
        weight.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_K=k % config.block_k == 0,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
