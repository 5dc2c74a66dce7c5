"""Write a step's new K/V into their paged-cache slots, applying rotary position embeddings
(rotate-half layout) on the way: one launch per layer rotates q in place and writes the
rotated k, and v, into the cache (a rotary launch and a store launch fused: at batch 256
each launch saved is a gap on the device, 24 a step for a 24-layer model).

One program per new token; a negative slot (a padded row, as a captured CUDA graph of a fixed
batch size will have) stores nothing. The attention kernels read keys from the cache only,
so `k` itself is left as it was.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zllm.worker.kernels.common import block, check_last_dim_contiguous


@triton.jit
def _rotate_q(
    Q,
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
    first = Q + base + h[:, None] * stride_h + j[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(Q.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(Q.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    Q,
    K,
    V,
    K_cache,
    V_cache,
    Cos,
    Sin,
    positions,
    slot_mapping,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    stride_cos,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    ROTATE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    j = tl.arange(0, BLOCK_HALF)  # each half of the head dim: rotary pairs j with j + HALF
    h = tl.arange(0, BLOCK_HK)
    # A padded row masks every head (a scalar folded into the bound: the interpreter rejects
    # `scalar_bool & tensor_mask`).
    heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)
    mask = (h[:, None] < heads) & (j[None, :] < HALF)
    k = K + t * stride_kt + h[:, None] * stride_kh + j[None, :]
    k1 = tl.load(k, mask=mask, other=0.0)
    k2 = tl.load(k + HALF, mask=mask, other=0.0)
    if ROTATE:
        pos = tl.load(positions + t).to(tl.int64)
        cos = tl.load(Cos + pos * stride_cos + j, mask=j < HALF, other=0.0)[None, :]
        sin = tl.load(Sin + pos * stride_cos + j, mask=j < HALF, other=0.0)[None, :]
        _rotate_q(Q, t * stride_qt, stride_qh, cos, sin, j, NUM_Q_HEADS, BLOCK_HQ, HALF)
        x1, x2 = k1.to(tl.float32), k2.to(tl.float32)
        k1 = (x1 * cos - x2 * sin).to(K_cache.dtype.element_ty)
        k2 = (x2 * cos + x1 * sin).to(K_cache.dtype.element_ty)
    k_dst = K_cache + page * stride_kc_b + offset * stride_kc_s + h[:, None] * stride_kc_h
    tl.store(k_dst + j[None, :], k1, mask=mask)
    tl.store(k_dst + j[None, :] + HALF, k2, mask=mask)
    v = V + t * stride_vt + h[:, None] * stride_vh + j[None, :]
    v_dst = V_cache + page * stride_vc_b + offset * stride_vc_s + h[:, None] * stride_vc_h
    tl.store(v_dst + j[None, :], tl.load(v, mask=mask), mask=mask)
    tl.store(v_dst + j[None, :] + HALF, tl.load(v + HALF, mask=mask), mask=mask)


def store_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """k, v: [T, Hkv, D] into `k_cache`, `v_cache` ([num_blocks, block_size, Hkv, D]) at
    `slot_mapping` ([T]). `rotary`: (positions [T], cos, sin [max_positions, D] float32, both
    halves equal): q ([T, Hq, D]) is rotated in place and k rotated on its way to the cache.
    Views may be strided; the head dim must be contiguous and even."""
    check_last_dim_contiguous(q, k, v, k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    # Without rotary the kernel reads none of these: any tensors stand in for them.
    positions, cos, sin = rotary if rotary is not None else (slot_mapping, k_cache, k_cache)
    if rotary is not None and (cos.stride(1) != 1 or sin.stride() != cos.stride()):
        raise ValueError("cos and sin must share a layout with a contiguous last dim")
    half = head_dim // 2
    _store_kv_kernel[(num_tokens,)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        cos,
        sin,
        positions,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        cos.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        BLOCK_HQ=block(num_q_heads),
        BLOCK_HK=block(num_kv_heads),
        HALF=half,
        BLOCK_HALF=block(half),
        PAGE_SIZE=k_cache.shape[1],
        ROTATE=rotary is not None,
        num_warps=4,
    )
