"""Pooling: one vector per prompt from the last layer's hidden states (any model family).

MEAN averages every prompt position, CLS takes the first, LAST the last. A decoder's prompt
may arrive over several steps (chunked prefill, or after a prefix-cache hit for LAST), so the
pooler keeps what it needs between chunks; a chunk that starts at position 0 starts over (a
preempted request recomputes). The vector is then cut to `dimensions` (Matryoshka) and
L2-normalized if asked, in float32, and leaves as little-endian float32 bytes.

A step may pool hundreds of prompts (an encoder's step holds up to `max_num_seqs` whole
prompts), so each stage runs once for the whole step, never once per prompt: one segment sum
(MEAN) or one row gather (CLS, LAST), one normalization and one device->host copy per distinct
`dimensions`. Only a prompt split over steps costs a small op of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zllm.protocol.pooler_config import PoolerConfig
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.worker_messages import WorkerSlot
from zllm.worker.transfer import to_device


@dataclass
class PoolingChunks:
    """A step's pooling requests, one entry of each array per request: rows
    [first_row, first_row + n) of the step's batch are its prompt positions [start, start + n)."""

    slots: np.ndarray  # [N] WorkerSlot
    first_row: np.ndarray  # [N]
    n: np.ndarray  # [N]
    start: np.ndarray  # [N]
    last: np.ndarray  # [N] bool: the prompt ends here, the vector is complete

    def __len__(self) -> int:
        return len(self.slots)


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

    def pool(self, hidden: torch.Tensor, chunks: PoolingChunks) -> dict[WorkerSlot, bytes]:
        """Fold this step's chunks in; return the finished requests' vectors."""
        states = [self.requests[slot] for slot in chunks.slots.tolist()]
        for state, start in zip(states, chunks.start.tolist()):
            if start == 0:
                state.partial = None
        done = np.flatnonzero(chunks.last)
        if self.pooling_type == "MEAN":
            vectors = self._mean(hidden, chunks, states, done)
        elif self.pooling_type == "CLS":
            vectors = self._cls(hidden, chunks, states, done)
        else:
            vectors = self._last(hidden, chunks, done)
        if not len(done):
            return {}
        slots = chunks.slots[done].tolist()
        params = [self.requests.pop(slot).params for slot in slots]
        return self._finish(slots, vectors, params)

    def _mean(
        self, hidden: torch.Tensor, chunks: PoolingChunks, states: list, done: np.ndarray
    ) -> torch.Tensor:
        """[len(done), D]: one segment sum over every chunk's rows, plus sums carried over."""
        sums = torch.zeros(len(chunks), hidden.shape[1], dtype=torch.float32, device=self.device)
        segments = np.repeat(np.arange(len(chunks)), chunks.n)
        offsets = np.cumsum(chunks.n) - chunks.n  # where each chunk's rows start in `rows`
        if len(segments) == len(hidden) and np.array_equal(chunks.first_row, offsets):
            rows = hidden  # the chunks are the whole batch, in order (an encoder's step)
        else:
            index = np.arange(len(segments)) + np.repeat(chunks.first_row - offsets, chunks.n)
            rows = hidden[to_device(index, torch.long, self.device)]
        # scatter_add_, not index_add_: the same sums, but index_add_ adds row by row on a CPU
        segments_t = to_device(segments, torch.long, self.device)
        sums.scatter_add_(0, segments_t.unsqueeze(1).expand(-1, hidden.shape[1]), rows.float())
        for i, (state, last) in enumerate(zip(states, chunks.last.tolist())):
            if state.partial is not None:  # a prompt split over steps (decoders only)
                sums[i] += state.partial
            if not last:
                state.partial = sums[i]
        counts = [states[i].num_prompt_tokens for i in done.tolist()]
        total = sums if len(done) == len(chunks) else sums[to_device(done, torch.long, self.device)]
        return total / to_device(counts, torch.float32, self.device).unsqueeze(1)

    def _cls(
        self, hidden: torch.Tensor, chunks: PoolingChunks, states: list, done: np.ndarray
    ) -> torch.Tensor | None:
        """[len(done), D]: the first row of each prompt, kept from its first chunk."""
        fresh = np.flatnonzero(chunks.start == 0)
        firsts = None
        if len(fresh):
            rows = to_device(chunks.first_row[fresh], torch.long, self.device)
            firsts = hidden[rows].float()
        if np.array_equal(fresh, done):  # whole prompts (an encoder's step): nothing kept
            return firsts
        for j, i in enumerate(fresh.tolist()):
            states[i].partial = firsts[j]
        if not len(done):
            return None
        return torch.stack([states[i].partial for i in done.tolist()])

    def _last(self, hidden: torch.Tensor, chunks: PoolingChunks, done: np.ndarray) -> torch.Tensor:
        """[len(done), D]: the last row of each prompt that ends in this step."""
        rows = chunks.first_row[done] + chunks.n[done] - 1
        return hidden[to_device(rows, torch.long, self.device)].float()

    def _finish(
        self, slots: list[WorkerSlot], vectors: torch.Tensor, params: list[PoolingParams]
    ) -> dict[WorkerSlot, bytes]:
        """Cut to `dimensions`, then normalize, then float32 LE bytes: one batch per distinct
        `dimensions` (usually one), one device->host copy each."""
        flags = [self.default_normalize if p.normalize is None else p.normalize for p in params]
        groups: dict[int | None, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.dimensions, []).append(i)
        out: dict[WorkerSlot, bytes] = {}
        for dimensions, members in groups.items():
            block = vectors
            if len(members) < len(params):
                block = vectors[to_device(members, torch.long, self.device)]
            block = self._normalized(block[:, :dimensions], [flags[i] for i in members])
            host = block.to("cpu").numpy().astype("<f4", copy=False)
            for row, i in enumerate(members):
                out[slots[i]] = host[row].tobytes()
        return out

    def _normalized(self, vectors: torch.Tensor, flags: list[bool]) -> torch.Tensor:
        """L2-normalize the rows whose flag is set."""
        if all(flags):
            return F.normalize(vectors, dim=-1)
        if not any(flags):
            return vectors
        mask = to_device(flags, torch.bool, self.device).unsqueeze(1)
        return torch.where(mask, F.normalize(vectors, dim=-1), vectors)
