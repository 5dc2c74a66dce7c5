"""Pooling: one vector per prompt from the last layer's hidden states (any model family).

MEAN averages every prompt position, CLS takes the first, LAST the last. A decoder's prompt
may arrive over several steps (chunked prefill, or after a prefix-cache hit for LAST), so the
pooler keeps what it needs between chunks; a chunk that starts at position 0 starts over (a
preempted request recomputes). The vector is then cut to `dimensions` (Matryoshka) and
L2-normalized if asked, in float32, and leaves as little-endian float32 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zllm.protocol.pooler_config import PoolerConfig
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.worker_messages import WorkerSlot
from zllm.worker.transfer import to_device


@dataclass
class PoolingChunk:
    """Rows [first_row, first_row + n) of the step's batch: prompt positions [start, start + n)."""

    key: WorkerSlot
    first_row: int
    n: int
    start: int
    last: bool  # the prompt ends here: the vector is complete


@dataclass
class _Pooling:
    params: PoolingParams
    num_prompt_tokens: int
    partial: torch.Tensor | None = None  # MEAN: sum of the rows so far; CLS: the first row


class Pooler:
    def __init__(self, config: PoolerConfig, device: torch.device) -> None:
        self.pooling_type = config.pooling_type
        self.default_normalize = config.normalize
        self.device = device
        self.requests: dict[WorkerSlot, _Pooling] = {}

    def add(self, key: WorkerSlot, params: PoolingParams, num_prompt_tokens: int) -> None:
        self.requests[key] = _Pooling(params, num_prompt_tokens)

    def drop(self, key: WorkerSlot) -> None:
        self.requests.pop(key, None)

    def pool(self, hidden: torch.Tensor, chunks: list[PoolingChunk]) -> dict[WorkerSlot, bytes]:
        """Fold this step's chunks in; return the finished requests' vectors."""
        for chunk in chunks:
            if chunk.start == 0:
                self.requests[chunk.key].partial = None
        if self.pooling_type == "MEAN":
            done = self._mean(hidden, chunks)
        elif self.pooling_type == "CLS":
            done = self._cls(hidden, chunks)
        else:
            done = self._last(hidden, chunks)
        if not done:
            return {}
        keys = [key for key, _ in done]
        vectors = self._finish([v for _, v in done], [self.requests.pop(k).params for k in keys])
        return _to_bytes(keys, vectors)

    def _mean(self, hidden: torch.Tensor, chunks: list[PoolingChunk]) -> list:
        rows = [r for c in chunks for r in range(c.first_row, c.first_row + c.n)]
        segments = [i for i, c in enumerate(chunks) for _ in range(c.n)]
        sums = torch.zeros(len(chunks), hidden.shape[1], dtype=torch.float32, device=self.device)
        sums.index_add_(
            0,
            to_device(segments, torch.long, self.device),
            hidden[to_device(rows, torch.long, self.device)].float(),
        )
        done = []
        for i, chunk in enumerate(chunks):
            state = self.requests[chunk.key]
            total = sums[i] if state.partial is None else state.partial + sums[i]
            if chunk.last:
                done.append((chunk.key, total / state.num_prompt_tokens))
            else:
                state.partial = total
        return done

    def _cls(self, hidden: torch.Tensor, chunks: list[PoolingChunk]) -> list:
        firsts = [c for c in chunks if c.start == 0]
        if firsts:
            rows = to_device([c.first_row for c in firsts], torch.long, self.device)
            for chunk, row in zip(firsts, hidden[rows].float()):
                self.requests[chunk.key].partial = row
        return [(c.key, self.requests[c.key].partial) for c in chunks if c.last]

    def _last(self, hidden: torch.Tensor, chunks: list[PoolingChunk]) -> list:
        lasts = [c for c in chunks if c.last]
        if not lasts:
            return []
        rows = to_device([c.first_row + c.n - 1 for c in lasts], torch.long, self.device)
        return list(zip((c.key for c in lasts), hidden[rows].float()))

    def _finish(self, vectors: list[torch.Tensor], params: list[PoolingParams]) -> list:
        """Cut to `dimensions`, then normalize, per request (batched when no one cuts)."""
        flags = [self.default_normalize if p.normalize is None else p.normalize for p in params]
        if any(p.dimensions is not None for p in params):
            out = []
            for v, p, normalize in zip(vectors, params, flags):
                v = v[: p.dimensions]
                out.append(F.normalize(v, dim=-1) if normalize else v)
            return out
        stacked = torch.stack(vectors)
        if all(flags):
            return list(F.normalize(stacked, dim=-1))
        if any(flags):
            mask = to_device(flags, torch.bool, self.device).unsqueeze(1)
            stacked = torch.where(mask, F.normalize(stacked, dim=-1), stacked)
        return list(stacked)


def _to_bytes(keys: list[WorkerSlot], vectors: list[torch.Tensor]) -> dict[WorkerSlot, bytes]:
    """One device->host copy for the step's vectors, then each as float32 LE bytes."""
    host = torch.cat(vectors).to("cpu").numpy().astype("<f4", copy=False)
    out, offset = {}, 0
    for key, v in zip(keys, vectors):
        out[key] = host[offset : offset + v.shape[0]].tobytes()
        offset += v.shape[0]
    return out
