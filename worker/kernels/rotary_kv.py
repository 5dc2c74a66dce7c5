"""Rotary embedding fused with the KV cache write: per layer and step, one launch rotates q in
place and writes the rotated k, and v, into their paged-cache slots (instead of a rotary
launch and a store launch; at batch 256 each launch saved is a gap on the device, ~24 a step).

One program per token; a negative slot (a padded row of a captured graph) stores nothing.
The attention kernels then read keys from the cache only, so `k` itself stays unrotated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zllm.worker.kernels.common import block, check_last_dim_contiguous
from zllm.worker.kernels.rotary import rotate_heads


@triton.jit
def _rotary_store_kernel(
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
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cos = tl.load(Cos + pos * stride_cos + j, mask=j < HALF, other=0.0)[None, :]
    sin = tl.load(Sin + pos * stride_cos + j, mask=j < HALF, other=0.0)[None, :]
    rotate_heads(Q, t * stride_qt, stride_qh, cos, sin, j, NUM_Q_HEADS, BLOCK_HQ, HALF)

    slot = tl.load(slot_mapping + t).to(tl.int64)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    h = tl.arange(0, BLOCK_HK)
    # A padded row masks every head (a scalar folded into the bound: the interpreter rejects
    # `scalar_bool & tensor_mask`).
    heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)
    mask = (h[:, None] < heads) & (j[None, :] < HALF)
    k = K + t * stride_kt + h[:, None] * stride_kh + j[None, :]
    k1 = tl.load(k, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(k + HALF, mask=mask, other=0.0).to(tl.float32)
    k_dst = K_cache + page * stride_kc_b + offset * stride_kc_s + h[:, None] * stride_kc_h
    k_dst += j[None, :]
    tl.store(k_dst, (k1 * cos - k2 * sin).to(K_cache.dtype.element_ty), mask=mask)
    tl.store(k_dst + HALF, (k2 * cos + k1 * sin).to(K_cache.dtype.element_ty), mask=mask)
    v = V + t * stride_vt + h[:, None] * stride_vh + j[None, :]
    v_dst = V_cache + page * stride_vc_b + offset * stride_vc_s + h[:, None] * stride_vc_h
    v_dst += j[None, :]
    tl.store(v_dst, tl.load(v, mask=mask), mask=mask)
    tl.store(v_dst + HALF, tl.load(v + HALF, mask=mask), mask=mask)


def rotate_and_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """q: [T, Hq, D] rotated in place; k, v: [T, Hkv, D] (strided views, last dim contiguous),
    k rotated into `k_cache`, v copied into `v_cache` ([num_blocks, block_size, Hkv, D]) at
    `slot_mapping` ([T]); cos, sin: [max_positions, D] float32, both halves equal."""
    check_last_dim_contiguous(q, k, v, k_cache, v_cache, cos)
    if sin.stride() != cos.stride():
        raise ValueError("cos and sin must share a layout")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    _rotary_store_kernel[(num_tokens,)](
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
        num_warps=4,
    )
