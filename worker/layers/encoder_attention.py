"""Bidirectional attention within a step, for encoders: no KV cache.

Every sequence of the step is a whole prompt (the scheduler never splits an encoder's
prompt), so its keys are exactly its own rows. The flat batch `[T, ...]` is scattered into a
padded `[B, L, ...]` batch, attended in one call with a key-padding mask, and gathered back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zllm.worker.input_batch import StepInputs
from zllm.worker.transfer import to_device


class EncoderAttentionBackend:
    """The attention backend of encoders (`worker/layers/attention.py`'s interface)."""

    name = "encoder"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def build_metadata(self, inputs: StepInputs) -> EncoderAttentionMetadata:
        return EncoderAttentionMetadata.build(inputs, self.device)


@dataclass
class EncoderAttentionMetadata:
    num_seqs: int
    max_len: int
    padded_rows: torch.Tensor  # [T] row of each token in the flat padded batch [B * L]
    key_mask: torch.Tensor | None  # [B, 1, 1, L] True where a key exists; None: no padding

    @classmethod
    def build(cls, inputs: StepInputs, device: torch.device) -> EncoderAttentionMetadata:
        """Only the lengths matter: nothing is cached, so block tables are unused."""
        if inputs.start.any():
            raise ValueError("an encoder runs each prompt whole, in one step")
        lengths = inputs.num_scheduled.tolist()
        width = max(lengths)
        rows = [b * width + i for b, n in enumerate(lengths) for i in range(n)]
        mask = None
        if any(n != width for n in lengths):
            lens = to_device(lengths, torch.long, device)
            mask = (torch.arange(width, device=device) < lens.unsqueeze(1))[:, None, None, :]
        return cls(len(lengths), width, to_device(rows, torch.long, device), mask)


def encoder_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: EncoderAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q, k, v: [T, H, D]. Returns [T, H, D]."""
    _, heads, dim = q.shape

    def padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [B, H, L, D]
        out = x.new_zeros(meta.num_seqs * meta.max_len, heads, dim)
        out[meta.padded_rows] = x
        return out.view(meta.num_seqs, meta.max_len, heads, dim).transpose(1, 2)

    o = F.scaled_dot_product_attention(
        padded(q), padded(k), padded(v), attn_mask=meta.key_mask, scale=scale
    )
    return o.transpose(1, 2).reshape(-1, heads, dim)[meta.padded_rows]
