"""Random paged-attention steps shared by the kernel tests and the GPU check.

A case is a batch of chunks (start position, new tokens) over a shuffled block pool with
holes; `run_case` runs it through the torch oracle and the Triton backend and returns both
outputs and caches, the Triton ones from NaN-poisoned buffers so an unwritten element shows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from zllm.worker.input_batch import inputs_for_chunks
from zllm.worker.layers.attention import TorchAttentionMetadata, paged_attention


@dataclass
class Case:
    chunks: list[tuple[int, int]]  # (start, new tokens) per sequence
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int = 16
    seed: int = 0


def random_case(
    seed: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    kinds: str = "dpxc",
    block_size: int = 16,
    max_len: int = 80,
) -> Case:
    """Chunks of the given kinds, shuffled: d decode, p fresh prefill, x prefix hit
    (extend after cached blocks), c a middle chunk of a chunked prefill."""
    rng = random.Random(seed)
    chunks = []
    for kind in kinds:
        if kind == "d":
            chunks.append((rng.randint(0, max_len), 1))
        elif kind == "p":
            chunks.append((0, rng.randint(2, max_len)))
        elif kind == "x":
            chunks.append((block_size * rng.randint(1, 3), rng.randint(2, max_len // 2)))
        elif kind == "c":
            chunks.append((rng.randint(1, max_len), rng.randint(2, max_len // 2)))
    rng.shuffle(chunks)
    return Case(chunks, num_heads, num_kv_heads, head_dim, dtype, block_size, seed)


def run_case(case: Case, device: str, **backend_options) -> dict[str, torch.Tensor]:
    from zllm.worker.layers.triton_attention import TritonAttentionBackend

    g = torch.Generator().manual_seed(case.seed)
    bs = case.block_size
    hq, hkv, d = case.num_heads, case.num_kv_heads, case.head_dim
    need = [-(-(s + n) // bs) for s, n in case.chunks]
    num_blocks = sum(need) * 2 + 3  # holes: half the pool stays unused
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for n_blocks in need:
        tables.append(pool[:n_blocks] + [pool[n_blocks]])  # one spare block past the context
        pool = pool[n_blocks + 1 :]
    shape = (2, num_blocks, bs, hkv, d)

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(case.dtype)

    oracle_cache = torch.zeros(shape, dtype=torch.float32)
    poisoned = torch.full(shape, float("nan"), dtype=case.dtype)
    for (start, _), table in zip(case.chunks, tables):
        for pos in range(start):  # the context cached by earlier steps
            block, offset = table[pos // bs], pos % bs
            kv = rand(2, hkv, d)
            poisoned[:, block, offset] = kv
            oracle_cache[:, block, offset] = kv.float()
    num_tokens = sum(n for _, n in case.chunks)
    q, k, v = rand(num_tokens, hq, d), rand(num_tokens, hkv, d), rand(num_tokens, hkv, d)
    scale = d**-0.5
    chunks = [(s, n, t) for (s, n), t in zip(case.chunks, tables)]

    written = torch.zeros(shape, dtype=torch.bool)
    for start, n, table in chunks:
        for pos in range(start + n):
            written[:, table[pos // bs], pos % bs] = True
    inputs = inputs_for_chunks(chunks, bs)
    meta = TorchAttentionMetadata.build(inputs, bs, torch.device("cpu"))
    expected = paged_attention(q.float(), k.float(), v.float(), oracle_cache, meta, scale)

    dev = torch.device(device)
    backend = TritonAttentionBackend(
        dev,
        bs,
        hq,
        hkv,
        d,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        max_model_len=512,
        **backend_options,
    )
    cache = poisoned.to(dev)
    out = torch.full((num_tokens, hq, d), float("nan"), dtype=case.dtype, device=dev)
    tmeta = backend.build_metadata(inputs)
    tmeta.attend(q.to(dev), k.to(dev), v.to(dev), cache, scale, out=out)
    return {
        "out": out.cpu().float(),
        "expected": expected,
        "cache": cache.cpu().float(),
        "expected_cache": oracle_cache,
        "written": written,
        "num_splits": torch.tensor(tmeta.num_splits),
    }
