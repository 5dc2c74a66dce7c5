"""The torch attention path (the CPU default and the Triton kernels' oracle) against plain
softmax attention over each sequence's whole context, and the CPU LM head against `linear`."""

from __future__ import annotations

import random

import pytest
import torch

from zllm.worker.input_batch import inputs_for_chunks
from zllm.worker.layers.attention import TorchAttentionMetadata, paged_attention
from zllm.worker.layers.linear import vocab_logits


def _reference(q, ks, vs, start: int, scale: float) -> torch.Tensor:
    """Queries at positions start.. over keys 0..(own position), in float64."""
    group = q.shape[1] // ks.shape[1]
    k = ks.double().repeat_interleave(group, dim=1)  # [L, H, D]
    v = vs.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    positions = torch.arange(start, start + q.shape[0])
    visible = torch.arange(k.shape[0])[None, :] <= positions[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_decodes_grouped_by_length_and_prefills_match_plain_attention(heads, kv_heads):
    rng = random.Random(heads)
    g = torch.Generator().manual_seed(heads)
    bs, d = 16, 32
    # Many decodes of spread-out lengths (grouped), a fresh prompt and a chunk after a cache.
    chunks = [(rng.randint(0, 300), 1) for _ in range(150)] + [(0, 40), (48, 20)]
    need = [-(-(s + n) // bs) for s, n in chunks]
    pool = torch.randperm(sum(need) + 7, generator=g).tolist()
    tables = []
    for n in need:
        tables.append(pool[:n])
        pool = pool[n:]
    cache = torch.zeros(2, sum(need) + 7, bs, kv_heads, d)
    contexts = []  # each sequence's cached K and V
    for (start, _), table in zip(chunks, tables):
        kv = torch.randn(2, start, kv_heads, d, generator=g)
        for pos in range(start):
            cache[:, table[pos // bs], pos % bs] = kv[:, pos]
        contexts.append(kv)
    total = sum(n for _, n in chunks)
    q = torch.randn(total, heads, d, generator=g)
    k = torch.randn(total, kv_heads, d, generator=g)
    v = torch.randn(total, kv_heads, d, generator=g)
    inputs = inputs_for_chunks([(s, n, t) for (s, n), t in zip(chunks, tables)], bs)
    meta = TorchAttentionMetadata.build(inputs, bs, torch.device("cpu"))
    assert len(meta.decodes) > 1  # the grouping is exercised
    scale = d**-0.5
    out = paged_attention(q, k, v, cache, meta, scale)

    row = 0
    for (start, n), (k_old, v_old) in zip(chunks, contexts):
        keys = torch.cat([k_old, k[row : row + n]])
        values = torch.cat([v_old, v[row : row + n]])
        expected = _reference(q[row : row + n], keys, values, start, scale)
        torch.testing.assert_close(out[row : row + n].double(), expected, atol=1e-5, rtol=1e-5)
        row += n


@pytest.mark.parametrize("rows", [1, 3, 256])
def test_vocab_logits_equal_linear(rows):
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 64, generator=g)
    weight = torch.randn(1000, 64, generator=g) * 0.1
    expected = torch.nn.functional.linear(hidden.double(), weight.double())
    torch.testing.assert_close(vocab_logits(hidden, weight).double(), expected, atol=1e-5, rtol=0)
    strided = torch.randn(rows, 128, generator=g)[:, ::2]  # a non-contiguous view
    torch.testing.assert_close(
        vocab_logits(strided, weight).double(),
        torch.nn.functional.linear(strided.double(), weight.double()),
        atol=1e-5,
        rtol=0,
    )
