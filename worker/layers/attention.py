"""Attention backends, and paged attention in plain torch (runs on CPU and CUDA).

A backend turns a step's inputs (`worker/input_batch.py`'s `StepInputs`: host arrays of
lengths, block tables and KV slots) into metadata (`build_metadata`), whose `attend` each
layer calls. The torch backend here is the CPU default and the oracle the Triton backend
(`worker/layers/triton_attention.py`, the CUDA default) is tested against.

The KV cache of a layer is `[2, num_blocks, block_size, kv_heads, head_dim]`. Each step
first writes the batch's new K/V into their slots, then every query attends to its own
sequence's blocks. Decodes (one query each) run as a few batched calls, grouped by context
length so that short contexts are not padded to the longest (the padded gather and softmax
are most of a CPU decode step's attention); prompt chunks run one call each, with a causal
mask offset by the tokens already cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from zllm.worker.input_batch import StepInputs
from zllm.worker.layers.rotary import RotaryEmbedding
from zllm.worker.transfer import to_device


class AttentionMetadata(Protocol):
    """One step's attention plan, shared by every layer."""

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        scale: float,
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rotate q and k by their `positions` (when `rotary`), write k, v into `kv_cache`,
        then attend. q: [T, Hq, D]; k, v: [T, Hkv, D]. A backend may fuse the rotation with
        the cache write, so q and k must not be read afterwards."""
        ...


class AttentionBackend(Protocol):
    name: str

    def build_metadata(self, inputs: StepInputs) -> AttentionMetadata: ...


class TorchAttentionBackend:
    """Gathers each sequence's blocks and calls `scaled_dot_product_attention`."""

    name = "torch"

    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device

    def build_metadata(self, inputs: StepInputs) -> TorchAttentionMetadata:
        return TorchAttentionMetadata.build(inputs, self.block_size, self.device)


@dataclass
class PrefillSeq:
    """A chunk of more than one token: rows [start, end) of the batch, context length `ctx_len`."""

    start: int
    end: int
    ctx_len: int
    block_ids: torch.Tensor  # [num_blocks] covering ctx_len
    mask: torch.Tensor | None  # None when the chunk is the whole context (plain causal)


@dataclass
class DecodeGroup:
    """Single-token chunks of similar context length, attended in one call."""

    rows: torch.Tensor  # [Bd] their batch rows
    block_table: torch.Tensor  # [Bd, blocks] covering the longest context of the group
    mask: torch.Tensor  # [Bd, 1, 1, blocks * block_size] True where a key is visible


DECODE_GROUP_ROWS = 64  # decodes per group at least (fewer calls would not pay)
MAX_DECODE_GROUPS = 4


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat slot of each new token
    decodes: list[DecodeGroup]
    prefills: list[PrefillSeq]

    @classmethod
    def build(
        cls, inputs: StepInputs, block_size: int, device: torch.device
    ) -> TorchAttentionMetadata:
        seq_lens = inputs.seq_lens
        single = inputs.num_scheduled == 1
        prefills: list[PrefillSeq] = []
        for i in np.flatnonzero(~single).tolist():
            start, ctx = int(inputs.start[i]), int(seq_lens[i])
            row, end = int(inputs.query_start[i]), int(inputs.query_start[i + 1])
            mask = None
            if start > 0:
                q_pos = torch.arange(start, ctx, device=device).unsqueeze(1)
                mask = torch.arange(ctx, device=device).unsqueeze(0) <= q_pos
            used = inputs.block_table[i, : -(-ctx // block_size)]
            prefills.append(PrefillSeq(row, end, ctx, to_device(used, torch.long, device), mask))
        decodes = np.flatnonzero(single)
        decodes = decodes[np.argsort(seq_lens[decodes], kind="stable")]
        num_groups = min(MAX_DECODE_GROUPS, max(1, len(decodes) // DECODE_GROUP_ROWS))
        groups = [
            _decode_group(inputs, members, block_size, device)
            for members in np.array_split(decodes, num_groups)
            if len(members)
        ]
        return cls(
            slot_mapping=to_device(inputs.slot_mapping, torch.long, device),
            decodes=groups,
            prefills=prefills,
        )

    def attend(self, q, k, v, kv_cache, scale, rotary=None, positions=None) -> torch.Tensor:
        if rotary is not None:
            q, k = rotary(positions, q, k)
        return paged_attention(q, k, v, kv_cache, self, scale)


def _decode_group(
    inputs: StepInputs, members: np.ndarray, block_size: int, device: torch.device
) -> DecodeGroup:
    lens = inputs.seq_lens[members]
    width = -(-int(lens.max()) // block_size)
    lens_t = to_device(lens, torch.long, device)
    return DecodeGroup(
        rows=to_device(inputs.query_start[members], torch.long, device),
        block_table=to_device(inputs.block_table[members, :width], torch.long, device),
        mask=(torch.arange(width * block_size, device=device) < lens_t.unsqueeze(1))[
            :, None, None, :
        ],
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: TorchAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D]. Returns [T, Hq, D]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    gqa = num_heads != num_kv_heads
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_size = k_cache.shape[1]
    k_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = k
    v_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = v
    out = torch.empty_like(q)

    def gather(block_ids: torch.Tensor) -> torch.Tensor:
        """K and V of these blocks, `[2, len(block_ids) * block_size, Hkv, D]`: one
        `index_select` over both (several times faster than indexing each on the CPU)."""
        blocks = kv_cache.index_select(1, block_ids.reshape(-1))
        return blocks.view(2, -1, num_kv_heads, head_dim)

    for seq in meta.prefills:
        qs = q[seq.start : seq.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if seq.mask is None:
            ks = k[seq.start : seq.end]
            vs = v[seq.start : seq.end]
        else:
            ks, vs = gather(seq.block_ids)[:, : seq.ctx_len]
        ks = ks.transpose(0, 1).unsqueeze(0)
        vs = vs.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=seq.mask, is_causal=seq.mask is None, scale=scale, enable_gqa=gqa
        )
        out[seq.start : seq.end] = o.squeeze(0).transpose(0, 1)

    group_size = num_heads // num_kv_heads
    for group in meta.decodes:
        bd, width = group.block_table.shape
        # The query heads sharing a KV head attend as that head's `group_size` queries: no
        # copy of K/V per query head, as `enable_gqa` would make.
        qd = q[group.rows].view(bd, num_kv_heads, group_size, head_dim)
        kvd = gather(group.block_table).view(2, bd, width * block_size, num_kv_heads, head_dim)
        kd, vd = kvd.transpose(2, 3).unbind(0)  # [Bd, Hkv, L, D] each
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.mask, scale=scale)
        out[group.rows] = o.reshape(bd, num_heads, head_dim)
    return out
