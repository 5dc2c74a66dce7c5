"""The step both attention kernels repeat: one block of keys from the paged cache folded
into a running (online-softmax) attention result."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_block(
    q,
    acc,
    m_i,
    l_i,
    K,
    V,
    table,
    n,
    n_mask,
    visible,
    d,
    d_mask,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    scale_log2,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """q: [M, D] (pre-upcast when UPCAST); acc: [M, D], m_i, l_i: [M] float32 (running
    output, max and sum, base 2); K, V: the cache pointers at this KV head; table: this
    sequence's block-table row; n: [N] key positions, `n_mask` those that exist; visible:
    [M, N] or [1, N], which query sees which key. Returns the updated (acc, m_i, l_i)."""
    page = tl.load(table + n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    offset = n % PAGE_SIZE
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(
        K + page[:, None] * stride_kb + offset[:, None] * stride_ks + d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        V + page[:, None] * stride_vb + offset[:, None] * stride_vs + d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    p = p.to(v.dtype)  # rounded as on the GPU path, where the second dot runs in v's dtype
    if UPCAST:
        p, v = p.to(tl.float32), v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i
