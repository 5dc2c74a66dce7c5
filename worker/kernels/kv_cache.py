"""Write a step's new K/V rows into their paged-cache slots.

One program per new token copies all its KV heads; a negative slot (a padded row, as a
captured CUDA graph of a fixed batch size will have) writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zllm.worker.kernels.common import block, check_last_dim_contiguous


@triton.jit
def _store_kv_kernel(
    K,
    V,
    K_cache,
    V_cache,
    slot_mapping,
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
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # A padded row masks every head (a scalar condition folded into the bound: the
    # interpreter rejects `scalar_bool & tensor_mask`).
    heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)
    mask = (h[:, None] < heads) & (d[None, :] < HEAD_DIM)
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    k_dst = K_cache + page * stride_kc_b + offset * stride_kc_s + h[:, None] * stride_kc_h
    v_dst = V_cache + page * stride_vc_b + offset * stride_vc_s + h[:, None] * stride_vc_h
    tl.store(k_dst + d[None, :], k, mask=mask)
    tl.store(v_dst + d[None, :], v, mask=mask)


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T] (int32)."""
    check_last_dim_contiguous(k, v, k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        NUM_KV_HEADS=num_kv_heads,
        BLOCK_H=block(num_kv_heads),
        HEAD_DIM=head_dim,
        BLOCK_D=block(head_dim),
        PAGE_SIZE=k_cache.shape[1],
    )
