"""The Triton attention backend (the CUDA default): a few kernels per layer and step.

Per layer: one launch that rotates q and k (rotary) and writes k, v into the cache, one
extend launch for every chunk of more than one token, and the decode launch (split, plus a
merge when a sequence's context is split over several programs) for every single-token
chunk; a phase with nothing to do launches an empty grid. The step's metadata lives in
device buffers allocated once at their largest (`max_num_seqs`, `max_num_batched_tokens`,
blocks for `max_model_len`) and filled in place from one pinned host tensor: the kernels
always read the same addresses, which is what capturing a decode step in a CUDA graph needs
(`worker/cuda_graphs.py`). A captured step fixes its launch sizes, so
`build_metadata(inputs, pad_to=n)` lays a decode batch out as `n` rows: the padded rows
write no KV (slot -1) and attend to one key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zllm.worker.input_batch import StepInputs
from zllm.worker.kernels.decode_attention import decode_attention
from zllm.worker.kernels.extend_attention import extend_attention
from zllm.worker.kernels.kv_cache import store_kv_cache
from zllm.worker.layers.rotary import RotaryEmbedding


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class TritonAttentionBackend:
    name = "triton"

    def __init__(
        self,
        device: torch.device,
        block_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        *,
        block_m: int = 64,
        block_n: int = 64,
        max_splits: int = 16,
        split_min_tokens: int = 256,
        target_programs: int | None = None,
    ) -> None:
        """`split_min_tokens`: the shortest context slice one decode program takes;
        `target_programs`: enough decode programs to fill the device (default: 2 per SM)."""
        if max_splits & (max_splits - 1):
            raise ValueError(f"max_splits must be a power of two, got {max_splits}")
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.block_m = block_m
        self.block_n = block_n
        self.max_splits = max_splits
        self.split_min_tokens = split_min_tokens
        if target_programs is None:
            target_programs = 64
            if self.device.type == "cuda":
                props = torch.cuda.get_device_properties(self.device)
                target_programs = 2 * props.multi_processor_count
        self.target_programs = target_programs
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_batched_tokens
        self.max_blocks = _cdiv(max_model_len, block_size)
        self.max_tiles = _cdiv(max_num_batched_tokens, block_m) + max_num_seqs

        def buffer(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=self.device)

        # The per-sequence and per-tile sections share one buffer, the per-token slots last,
        # so a step uploads them in one copy of the used prefix (each launch of a copy costs
        # the host more than the bytes cost the bus).
        capacities = [max_num_seqs, max_num_seqs + 1, max_num_seqs, self.max_tiles]
        capacities += [self.max_tiles, max_num_batched_tokens]
        self._offsets = np.cumsum([0, *capacities]).tolist()
        self._sections = buffer(self._offsets[-1])
        (
            self.seq_lens,
            self.query_start,
            self.decode_seqs,
            self.tile_seqs,
            self.tile_starts,
            self.slot_mapping,
        ) = (self._sections[a:b] for a, b in zip(self._offsets, self._offsets[1:]))
        self.block_tables = buffer(max_num_seqs, self.max_blocks)
        # Partial results of split decodes, shared by all layers (they run one after another).
        self.mid_out = buffer(max_num_seqs, num_heads, max_splits, head_dim, dtype=torch.float32)
        self.mid_lse = buffer(max_num_seqs, num_heads, max_splits, dtype=torch.float32)

    def decode_splits(self, num_decodes: int, longest: int | None = None) -> int:
        """Context slices per decode: enough programs to fill the device, none shorter than
        `split_min_tokens` of the longest context (unknown for a captured graph: the kernel
        leaves the slices past a shorter context empty)."""
        splits = self.max_splits
        if longest is not None:
            splits = min(splits, _cdiv(longest, self.split_min_tokens))
        wanted = _cdiv(self.target_programs, num_decodes * self.num_kv_heads)
        return max(1, min(splits, wanted))

    def build_metadata(
        self, inputs: StepInputs, pad_to: int | None = None
    ) -> TritonAttentionMetadata:
        """Copy the step's metadata into the device buffers. `pad_to`: a decode-only step laid
        out as `pad_to` rows for a CUDA graph captured at that size."""
        num_seqs = len(inputs.slots)
        if num_seqs > self.max_num_seqs:
            raise ValueError(f"{num_seqs} sequences in a step > max_num_seqs={self.max_num_seqs}")
        num_tokens = len(inputs.slot_mapping)
        if num_tokens > self.max_num_tokens:
            raise ValueError(
                f"{num_tokens} tokens in a step > max_num_batched_tokens={self.max_num_tokens}"
            )
        width = inputs.block_table.shape[1]
        if width > self.max_blocks:
            raise ValueError(f"a sequence spans {width} blocks > {self.max_blocks} (max_model_len)")
        n = inputs.num_scheduled
        seq_lens = inputs.seq_lens
        slot_mapping, query_start = inputs.slot_mapping, inputs.query_start
        if pad_to is not None:
            if pad_to > self.max_num_seqs or pad_to < num_seqs or (n != 1).any():
                raise ValueError(f"cannot lay out this step as {pad_to} decode rows")
            pad = pad_to - num_seqs
            slot_mapping = np.concatenate([slot_mapping, np.full(pad, -1, np.int64)])
            seq_lens = np.concatenate([seq_lens, np.ones(pad, np.int64)])
            query_start = np.arange(pad_to + 1)
            n = np.ones(pad_to, np.int64)
            num_tokens = pad_to
        decode_seqs = np.flatnonzero(n == 1)
        prefill_seqs = np.flatnonzero(n > 1)
        tiles = -(-n[prefill_seqs] // self.block_m)  # extend tiles of each prompt chunk
        tile_seqs = np.repeat(prefill_seqs, tiles)
        first_tile = np.repeat(np.cumsum(tiles) - tiles, tiles)
        tile_starts = (np.arange(len(tile_seqs)) - first_tile) * self.block_m
        sections = [seq_lens, query_start, decode_seqs, tile_seqs, tile_starts, slot_mapping]
        # One host tensor per step (pinned on CUDA, kept alive by the caching host allocator
        # until its copies ran) laid out as the device buffer, then the block table; two
        # copies into the persistent buffers, without waiting.
        used = self._offsets[-2] + len(slot_mapping)
        table = inputs.block_table.reshape(-1)
        pinned = self.device.type == "cuda"
        host = torch.empty(used + len(table), dtype=torch.int32, pin_memory=pinned)
        values = host.numpy()
        for start, section in zip(self._offsets, sections):
            values[start : start + len(section)] = section
        values[used:] = table
        self._sections[:used].copy_(host[:used], non_blocking=pinned)
        if width:
            self.block_tables[:num_seqs, :width].copy_(
                host[used:].view(num_seqs, width), non_blocking=pinned
            )
        num_splits = 1
        if pad_to is not None:
            num_splits = self.decode_splits(pad_to)
        elif len(decode_seqs):
            num_splits = self.decode_splits(len(decode_seqs), int(seq_lens[decode_seqs].max()))
        return TritonAttentionMetadata(
            self, num_tokens, len(decode_seqs), len(tile_seqs), num_splits
        )


@dataclass
class TritonAttentionMetadata:
    backend: TritonAttentionBackend
    num_tokens: int
    num_decodes: int
    num_tiles: int
    num_splits: int

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        scale: float,
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = self.backend
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        tables = None if rotary is None else (positions, rotary.cos, rotary.sin)
        store_kv_cache(q, k, v, k_cache, v_cache, b.slot_mapping[: self.num_tokens], tables)
        out = torch.empty_like(q) if out is None else out
        extend_attention(
            q,
            k_cache,
            v_cache,
            out,
            b.block_tables,
            b.seq_lens,
            b.query_start,
            b.tile_seqs,
            b.tile_starts,
            self.num_tiles,
            scale,
            block_m=b.block_m,
            block_n=b.block_n,
        )
        decode_attention(
            q,
            k_cache,
            v_cache,
            out,
            b.block_tables,
            b.seq_lens,
            b.query_start,
            b.decode_seqs,
            self.num_decodes,
            self.num_splits,
            b.mid_out,
            b.mid_lse,
            scale,
            block_n=b.block_n,
        )
        return out
