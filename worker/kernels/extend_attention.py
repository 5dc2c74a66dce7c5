"""Prefill / extend attention over the paged KV cache, variable lengths in one launch.

Each chunk of more than one token attends to everything its sequence has cached before it
(a prefix-cache hit, earlier chunks of a chunked prefill) and to itself causally. The new
K/V are already in the cache (`store_kv_cache` runs first), so keys come from one place.

Grid `(tiles, q_heads)`: a tile is `BLOCK_M` consecutive query rows of one sequence, listed
in `tile_seqs` / `tile_starts` (built on the host with the rest of the step's metadata),
so a batch of any mix of lengths is one launch. Keys are gathered through the block table
`BLOCK_N` at a time, up to the tile's last visible position.
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
from zllm.worker.kernels.decode_attention import LOG2E


@triton.jit
def _extend_kernel(
    Q,
    K_cache,
    V_cache,
    Out,
    block_tables,
    seq_lens,
    query_start,
    tile_seqs,
    tile_starts,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = tl.load(tile_seqs + tile)
    m0 = tl.load(tile_starts + tile)
    q_begin = tl.load(query_start + seq)
    q_len = tl.load(query_start + seq + 1) - q_begin
    ctx_len = tl.load(seq_lens + seq)
    prefix = ctx_len - q_len

    m = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = m < q_len
    d_mask = d < HEAD_DIM
    rows = (q_begin + m).to(tl.int64)
    positions = prefix + m
    q = tl.load(
        Q + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    table = block_tables + seq.to(tl.int64) * stride_bt
    kv_end = tl.minimum(ctx_len, prefix + m0 + BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Every row sees key 0 in the first block, so its running max is finite from there on.
    for n0 in range(0, kv_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < kv_end
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
            n_mask[None, :] & (n[None, :] <= positions[:, None]),
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

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        Out + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    tile_seqs: torch.Tensor,
    tile_starts: torch.Tensor,
    num_tiles: int,
    scale: float,
    block_m: int = 64,
    block_n: int = 64,
) -> None:
    """Causal attention of every tile's rows over their sequence's cache.

    q, out: [T, Hq, D]; caches: [num_blocks, block_size, Hkv, D]; block_tables: [S, W] int32;
    seq_lens: [S] context lengths after this chunk; query_start: [S + 1]; tile_seqs,
    tile_starts: [>= num_tiles] the sequence and first row (within its chunk) of each tile.
    """
    check_last_dim_contiguous(q, out, k_cache, v_cache)
    num_heads, head_dim = q.shape[1], q.shape[2]
    _extend_kernel[(num_tiles, num_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start,
        tile_seqs,
        tile_starts,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // k_cache.shape[2],
        HEAD_DIM=head_dim,
        BLOCK_D=block(head_dim, 16),
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        UPCAST=upcast_dot_operands(q.dtype),
        num_warps=4,
        num_stages=2,
    )
