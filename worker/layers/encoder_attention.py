"""Bidirectional attention within a step, for encoders: no KV cache.

Every sequence of the step is a whole prompt (the scheduler never splits an encoder's
prompt), so its keys are exactly its own rows. The flat batch `[T, ...]` is scattered into a
padded `[B, L, ...]` batch, attended in one call with a key-padding mask, and gathered back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zllm.worker.input_batch import StepInputs
from zllm.worker.transfer import to_device

# An encoder step on a CPU runs in passes of about this many tokens. A pooling engine's steps
# are large (32768 tokens: few steps, little host work per sentence), but a CPU computes a pass
# whose activations stay in its caches faster: all-MiniLM-L6-v2 embeds about a third more
# sentences per second in passes of 2048 tokens than in one pass of 20,000 (1024 and 4096 do
# worse than 2048). A GPU runs a step in one pass.
CPU_PASS_TOKENS = 2048


class EncoderAttentionBackend:
    """The attention backend of encoders (`worker/layers/attention.py`'s interface)."""

    name = "encoder"

    def __init__(self, device: torch.device, pass_tokens: int | None = None) -> None:
        """`pass_tokens`: the most tokens a pass holds (a longer prompt runs alone); by
        default `CPU_PASS_TOKENS` on a CPU, the whole step on a GPU."""
        self.device = device
        self.pass_tokens = pass_tokens or (CPU_PASS_TOKENS if device.type == "cpu" else None)

    def build_metadata(self, inputs: StepInputs) -> list[EncoderPass]:
        """The step's passes: consecutive runs of whole prompts. Only the lengths matter:
        nothing is cached, so block tables are unused."""
        if inputs.start.any():
            raise ValueError("an encoder runs each prompt whole, in one step")
        lengths, first = inputs.num_scheduled, inputs.query_start
        return [
            EncoderPass(
                slice(int(first[i]), int(first[j])),
                EncoderAttentionMetadata.build(lengths[i:j], self.device),
            )
            for i, j in _runs(lengths, self.pass_tokens)
        ]


def _runs(lengths: np.ndarray, limit: int | None) -> list[tuple[int, int]]:
    """Consecutive runs [i, j) of prompts holding at most `limit` tokens each (or one prompt)."""
    if limit is None or int(lengths.sum()) <= limit:
        return [(0, len(lengths))]
    runs, start, total = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if total and total + n > limit:
            runs.append((start, i))
            start, total = i, 0
        total += n
    runs.append((start, len(lengths)))
    return runs


@dataclass
class EncoderAttentionMetadata:
    num_seqs: int
    max_len: int
    padded_rows: torch.Tensor  # [T] row of each token in the flat padded batch [B * L]
    key_mask: torch.Tensor | None  # [B, 1, 1, L] True where a key exists; None: no padding

    @classmethod
    def build(cls, lengths: np.ndarray, device: torch.device) -> EncoderAttentionMetadata:
        """For prompts of these lengths, laid out one after another. Array operations only: a
        step may hold tens of thousands of tokens."""
        width = int(lengths.max())
        shift = np.arange(len(lengths)) * width - (np.cumsum(lengths) - lengths)  # flat->padded
        rows = np.arange(int(lengths.sum())) + np.repeat(shift, lengths)
        mask = None
        if (lengths != width).any():
            lens = to_device(lengths, torch.long, device)
            mask = (torch.arange(width, device=device) < lens.unsqueeze(1))[:, None, None, :]
        return cls(len(lengths), width, to_device(rows, torch.long, device), mask)


@dataclass
class EncoderPass:
    """Some of a step's prompts, run through the model together: tokens `rows` of the step."""

    rows: slice
    attention: EncoderAttentionMetadata


def encoder_attention(
    qkv: torch.Tensor, num_heads: int, meta: EncoderAttentionMetadata, scale: float
) -> torch.Tensor:
    """qkv: [T, 3 * H * D], queries then keys then values. Returns [T, H, D].

    The three are padded together, in one scatter: padded keys and values must be zeros (a
    masked key still meets its value in the product), padded queries' rows are dropped.
    """
    rows, batch, width = meta.padded_rows, meta.num_seqs, meta.max_len
    dim = qkv.shape[1] // (3 * num_heads)
    padded = qkv.new_zeros(batch * width, qkv.shape[1])
    padded[rows] = qkv
    q, k, v = padded.view(batch, width, 3, num_heads, dim).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.key_mask, scale=scale)
    return o.transpose(1, 2).reshape(batch * width, num_heads, dim)[rows]
