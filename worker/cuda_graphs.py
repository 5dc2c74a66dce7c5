"""Decode steps replayed from CUDA graphs, captured once at a ladder of padded batch sizes.

A decode step of a small batch launches a few hundred short kernels; launched one by one
from Python the GPU waits on the host most of the step. Captured in a graph, the whole
forward is one launch. A graph fixes its addresses and launch sizes, so: the token ids and
positions go into static buffers here, the attention metadata into the Triton backend's
persistent buffers (`build_metadata(..., pad_to=size)`), and a batch of `n` decodes replays
the smallest graph of at least `n` rows; the padded rows write no KV and are never read.
Prompt chunks, pooling and prompt logprobs run eagerly. The graph also computes the logits
and their greedy argmax (on one GPU: under tensor parallelism the logits gather on rank 0 and
run eagerly after the replay): a greedy batch samples with no launch of its own, and any
other batch samples from the graph's logits. Their buffers are the graph's, so a step's
sampled ids must be copied out (they are, into the batch and to the host) before the next
replay.

Graphs hold the addresses of the weights and the KV cache: whatever moves them (sleep mode)
drops the graphs, and they are captured again when both are back.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import torch

from zllm.worker import transfer
from zllm.worker.input_batch import StepInputs
from zllm.worker.kernels.argmax import argmax
from zllm.worker.layers.linear import tp_size
from zllm.worker.layers.triton_attention import TritonAttentionBackend
from zllm.worker.models.interface import Model

logger = logging.getLogger(__name__)


class GraphOutputs(NamedTuple):
    """A replayed step's rows (the real batch, padding cut off); views of the graph's
    buffers. `logits`/`greedy` are None when the graph stops at the hidden states."""

    hidden: torch.Tensor
    logits: torch.Tensor | None
    greedy: torch.Tensor | None


def capture_sizes(max_num_seqs: int, asked: list[int] | None = None) -> list[int]:
    """Batch sizes to capture: `asked` (vLLM's `cudagraph_capture_sizes`), else 1, 2, 4, 8
    and every multiple of 16, up to `max_num_seqs` (included)."""
    if asked is not None:
        if not asked or any(not isinstance(n, int) or n < 1 for n in asked):
            raise ValueError(f"cudagraph_capture_sizes must be positive integers, got {asked}")
        if max(asked) > max_num_seqs:
            raise ValueError(f"cudagraph_capture_sizes: {max(asked)} > max_num_seqs={max_num_seqs}")
        return sorted(set(asked))
    sizes = [n for n in (1, 2, 4, 8) if n < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(
        self, backend: TritonAttentionBackend, device: torch.device, sizes: list[int]
    ) -> None:
        self.backend = backend
        self.device = device
        self.sizes = sizes
        self.input_ids = torch.zeros(max(sizes), dtype=torch.long, device=device)
        self.positions = torch.zeros(max(sizes), dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, GraphOutputs]] = {}
        self._pool = None

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def size_for(self, inputs: StepInputs) -> int | None:
        """The graph this step can replay (None: run it eagerly)."""
        n = len(inputs.slots)
        if not self._graphs or n == 0 or n > self.sizes[-1] or (inputs.num_scheduled != 1).any():
            return None
        return self.sizes[int(np.searchsorted(self.sizes, n))]

    @torch.inference_mode()
    def capture(
        self, model: Model, kv_caches: list[torch.Tensor], sizes: list[int] | None = None
    ) -> float:
        """Capture a graph per size (largest first: the smaller ones reuse its memory pool);
        return the seconds it took."""
        start = time.perf_counter()
        empty = _empty_inputs()
        with_logits = model.can_generate and tp_size() == 1

        def forward(ids: torch.Tensor, positions: torch.Tensor, meta) -> GraphOutputs:
            hidden = model(ids, positions, kv_caches, meta)
            if not with_logits:
                return GraphOutputs(hidden, None, None)
            logits = model.logits(hidden)
            return GraphOutputs(hidden, logits, argmax(logits))

        for size in sorted(sizes or self.sizes, reverse=True):
            meta = self.backend.build_metadata(empty, pad_to=size)
            ids, positions = self.input_ids[:size], self.positions[:size]
            forward(ids, positions, meta)  # compiles and tunes outside the graph
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = forward(ids, positions, meta)
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[size] = (graph, outputs)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def replay(self, inputs: StepInputs, size: int) -> GraphOutputs:
        """The step's hidden states `[n, hidden]` (and logits, greedy ids), from the graph of
        `size` rows. The caller has put the step's ids in `input_ids[:n]`."""
        n = len(inputs.slots)
        self.backend.build_metadata(inputs, pad_to=size)
        transfer.copy_into(self.positions[:n], inputs.positions)
        graph, outputs = self._graphs[size]
        graph.replay()
        return GraphOutputs(*(None if t is None else t[:n] for t in outputs))

    def drop(self) -> None:
        """Forget every graph and its memory pool (the weights or the KV cache will move)."""
        self._graphs.clear()
        self._pool = None


def _empty_inputs() -> StepInputs:
    none = np.zeros(0, np.int64)
    return StepInputs(
        slots=none,
        num_scheduled=none,
        start=none,
        query_start=np.zeros(1, np.int64),
        input_ids=none,
        positions=none,
        slot_mapping=none,
        block_table=np.zeros((0, 0), np.int32),
        ends=np.zeros(0, bool),
    )
