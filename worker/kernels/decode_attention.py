"""Decode attention over the paged KV cache: one query token per sequence (flash-decoding).

Grid `(decodes, kv_heads, splits)`: each program takes one sequence, one KV head and all the
query heads that share it (GQA; the group is padded to 16 rows so `tl.dot` runs on tensor
cores), and one contiguous slice of the context. Keys are gathered through the block table
`BLOCK_N` tokens at a time. Each program writes its slice's normalised output and
log-sum-exp; a second kernel merges the slices. With one split (enough sequences to fill the
device) the program writes its output directly and there is no merge: one launch, not two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zllm.worker.kernels.attention_block import attend_block
from zllm.worker.kernels.common import (
    block,
    check_last_dim_contiguous,
    dot_precision,
    upcast_dot_operands,
)

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q,
    K_cache,
    V_cache,
    Out,
    Mid_out,
    Mid_lse,
    block_tables,
    seq_lens,
    query_start,
    decode_seqs,
    scale_log2,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_mo_i,
    stride_mo_h,
    stride_mo_s,
    stride_ml_i,
    stride_ml_h,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    DIRECT: tl.constexpr,
):
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(decode_seqs + i)
    seq_len = tl.load(seq_lens + seq)
    row = tl.load(query_start + seq).to(tl.int64)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_mask = h < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + h
    q = tl.load(
        Q + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    table = block_tables + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        acc, m_i, l_i = attend_block(
            q,
            acc,
            m_i,
            l_i,
            K_cache + kv_head * stride_kh,
            V_cache + kv_head * stride_vh,
            table,
            n,
            n_mask,
            n_mask[None, :],
            d,
            d_mask,
            stride_kb,
            stride_ks,
            stride_vb,
            stride_vs,
            scale_log2,
            PAGE_SIZE,
            DOT_PRECISION,
            UPCAST,
        )

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    mask = h_mask[:, None] & d_mask[None, :]
    if DIRECT:  # the only split: this is the output
        dst = Out + row * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, out.to(Out.dtype.element_ty), mask=mask)
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        mid = Mid_out + i.to(tl.int64) * stride_mo_i + split * stride_mo_s
        tl.store(mid + heads[:, None] * stride_mo_h + d[None, :], out, mask=mask)
        lse_dst = Mid_lse + i.to(tl.int64) * stride_ml_i + heads * stride_ml_h + split
        tl.store(lse_dst, lse, mask=h_mask)


@triton.jit
def _decode_reduce_kernel(
    Out,
    Mid_out,
    Mid_lse,
    query_start,
    decode_seqs,
    num_splits,
    stride_ot,
    stride_oh,
    stride_mo_i,
    stride_mo_h,
    stride_mo_s,
    stride_ml_i,
    stride_ml_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    i = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(decode_seqs + i)
    row = tl.load(query_start + seq).to(tl.int64)
    s = tl.arange(0, MAX_SPLITS)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    d_mask = d < HEAD_DIM
    lse = tl.load(
        Mid_lse + i.to(tl.int64) * stride_ml_i + head * stride_ml_h + s,
        mask=s_mask,
        other=float("-inf"),
    )
    top = tl.max(lse, 0)
    valid = lse > float("-inf")
    weight = tl.where(valid, tl.exp2(lse - tl.where(valid, top, 0.0)), 0.0)
    total = tl.sum(weight, 0)
    weight = weight / tl.where(total > 0.0, total, 1.0)
    parts = tl.load(
        Mid_out
        + i.to(tl.int64) * stride_mo_i
        + head * stride_mo_h
        + s[:, None] * stride_mo_s
        + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(parts * weight[:, None], 0)
    tl.store(
        Out + row * stride_ot + head * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_mask
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    decode_seqs: torch.Tensor,
    num_decodes: int,
    num_splits: int,
    mid_out: torch.Tensor,
    mid_lse: torch.Tensor,
    scale: float,
    block_n: int = 64,
) -> None:
    """Attention of the single query row of each sequence in `decode_seqs[:num_decodes]`.

    q, out: [T, Hq, D]; caches: [num_blocks, block_size, Hkv, D]; block_tables: [S, W] int32;
    seq_lens: [S] context lengths (this token included); query_start: [S + 1] row offsets;
    mid_out: [>= num_decodes, Hq, MAX_SPLITS, D] float32; mid_lse: [>= num_decodes, Hq,
    MAX_SPLITS] float32 (MAX_SPLITS a power of two >= num_splits).
    """
    check_last_dim_contiguous(q, out, k_cache, v_cache, mid_out)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_splits = mid_lse.shape[2]
    if num_splits > max_splits:
        raise ValueError(f"num_splits={num_splits} > the buffers' {max_splits}")
    direct = num_splits == 1
    _decode_split_kernel[(num_decodes, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        mid_out,
        mid_lse,
        block_tables,
        seq_lens,
        query_start,
        decode_seqs,
        scale * LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        *mid_out.stride()[:3],
        *mid_lse.stride()[:2],
        GROUP=group,
        BLOCK_H=block(group, 16),
        HEAD_DIM=head_dim,
        BLOCK_D=block(head_dim, 16),
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        UPCAST=upcast_dot_operands(q.dtype),
        DIRECT=direct,
        num_warps=4,
    )
    if direct:
        return
    _decode_reduce_kernel[(num_decodes, num_heads)](
        out,
        mid_out,
        mid_lse,
        query_start,
        decode_seqs,
        num_splits,
        out.stride(0),
        out.stride(1),
        *mid_out.stride()[:3],
        *mid_lse.stride()[:2],
        HEAD_DIM=head_dim,
        BLOCK_D=block(head_dim),
        MAX_SPLITS=max_splits,
        num_warps=1,
    )
