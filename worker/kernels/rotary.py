"""Rotary position embedding (rotate-half layout) applied to q and k in place, one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zllm.worker.kernels.common import block


@triton.jit
def rotate_heads(
    X,
    base,
    stride_h,
    cos,
    sin,
    j,
    NUM_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < NUM_HEADS) & (j[None, :] < HALF)
    first = X + base + h[:, None] * stride_h + j[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q,
    K,
    Cos,
    Sin,
    positions,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cos = tl.load(Cos + pos * stride_cos + j, mask=j < HALF, other=0.0)[None, :]
    sin = tl.load(Sin + pos * stride_cos + j, mask=j < HALF, other=0.0)[None, :]
    rotate_heads(Q, t * stride_qt, stride_qh, cos, sin, j, NUM_Q_HEADS, BLOCK_HQ, HALF)
    rotate_heads(K, t * stride_kt, stride_kh, cos, sin, j, NUM_K_HEADS, BLOCK_HK, HALF)


def apply_rotary_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """q: [T, Hq, D], k: [T, Hk, D] (views may be strided, last dim contiguous), rotated in
    place; cos, sin: [max_positions, D] float32 with both halves equal (only the first is read)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rotary kernel needs contiguous head dims and matching cos/sin layouts")
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        cos,
        sin,
        positions,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        BLOCK_HQ=block(num_q_heads),
        BLOCK_HK=block(num_k_heads),
        HALF=half,
        BLOCK_HALF=block(half),
        num_warps=4,
    )
