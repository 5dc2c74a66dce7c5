"""Applies a step to the persistent batch, runs the model, samples (or pools).

Per-request state lives in `worker/input_batch.py`, indexed by slot. Under tensor
parallelism every rank keeps the same batch and runs the same step; the logits are gathered
on rank 0, which alone samples and then broadcasts the sampled ids, so every rank's batch
holds the same tokens (the next step's inputs).

A step is `launch`ed (all its device work queued, nothing waited for) and later `finish`ed
(its results read on the host): the worker process launches the next step in between when
it can, so the device does not wait while the host prepares a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from zllm.protocol.config import ModelConfig
from zllm.protocol.messages import Logprobs
from zllm.protocol.worker_messages import ExecuteModel, ModelOutput, NewRequest, WorkerSlot
from zllm.worker import transfer
from zllm.worker.input_batch import InputBatch, SlotState, StepInputs
from zllm.worker.layers.attention import AttentionBackend, TorchAttentionBackend
from zllm.worker.layers.linear import tp_rank, tp_size
from zllm.worker.models.interface import Model
from zllm.worker.pooler import Pooler, PoolingChunks
from zllm.worker.sampler import Sampler, SamplingRequest, gather_logprobs

if TYPE_CHECKING:  # imports triton, which a CPU-only install may lack
    from zllm.worker.cuda_graphs import DecodeGraphs

PROMPT_LOGPROBS_ROWS = 512  # prompt positions per logits matmul: bounds the [rows, V] buffer


@dataclass
class PendingStep:
    """A launched step whose results may still be on their way to the host."""

    prompt_parts: dict[WorkerSlot, list[tuple[torch.Tensor, ...]]] = field(default_factory=dict)
    pooled: dict[WorkerSlot, bytes] = field(default_factory=dict)
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # that sampled
    states: list[SlotState] = field(default_factory=list)  # theirs at launch
    positions: np.ndarray | None = None  # where their tokens go in the batch
    tokens: torch.Tensor | None = None  # host copy of the sampled ids
    gathered: tuple[torch.Tensor, ...] | None = None  # logprobs, host copies
    logprob_ks: list[int | None] = field(default_factory=list)
    event: torch.cuda.Event | None = None  # recorded after the step's last copy

    def done(self) -> bool:
        return self.event is None or self.event.query()


@dataclass
class _PromptRows:
    """Hidden rows of one chunk that predict prompt tokens."""

    slot: WorkerSlot
    first_row: int
    targets: list[int]  # the prompt tokens those rows predict
    k: int
    targets_t: torch.Tensor | None = None  # on the device, copied before the forward


class ModelRunner:
    def __init__(
        self,
        model: Model,
        config: ModelConfig,
        device: torch.device,
        block_size: int,
        attn_backend: AttentionBackend | None = None,
        max_num_seqs: int = 256,
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.block_size = block_size
        self.attn_backend = attn_backend or TorchAttentionBackend(block_size, device)
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler(
            config.vocab_size, device, fused_argmax=self.attn_backend.name == "triton"
        )
        self.batch = InputBatch(max_num_seqs, config.max_model_len, block_size)
        self.pooler = Pooler(config.pooler_config, device) if config.pooler_config else None
        self.samples = tp_rank() == 0  # the other ranks get the sampled ids from rank 0
        self.graphs: DecodeGraphs | None = None  # set by `use_cuda_graphs`
        self._last_sampled = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self._long = {"dtype": torch.long, "device": device}

    def use_cuda_graphs(self, sizes: list[int]) -> None:
        """Replay decode steps of up to `max(sizes)` requests from CUDA graphs (captured by
        `capture_graphs` once the KV cache exists)."""
        from zllm.worker.cuda_graphs import DecodeGraphs
        from zllm.worker.layers.triton_attention import TritonAttentionBackend

        if not isinstance(self.attn_backend, TritonAttentionBackend):
            raise ValueError("CUDA graphs need the Triton attention backend")
        self.graphs = DecodeGraphs(self.attn_backend, self.device, sizes)

    def capture_graphs(self, sizes: list[int] | None = None) -> float:
        """Capture the decode graphs over the current weights and KV cache; return seconds."""
        assert self.graphs is not None and self.kv_caches
        self.graphs.drop()
        return self.graphs.capture(self.model, self.kv_caches, sizes)

    # ---- KV cache ------------------------------------------------------------------------------

    def kv_bytes_per_block(self, num_kv_heads: int) -> int:
        dtype = next(self.model.parameters()).dtype
        per_layer = 2 * self.block_size * num_kv_heads * self.config.head_dim * dtype.itemsize
        return per_layer * self.config.num_hidden_layers

    def allocate_kv_cache(self, num_blocks: int, num_kv_heads: int) -> None:
        if not self.model.uses_kv_cache:  # its blocks are only the scheduler's accounting
            return
        dtype = next(self.model.parameters()).dtype
        shape = (2, num_blocks, self.block_size, num_kv_heads, self.config.head_dim)
        # zeros, not empty: masked-out keys must be finite or they poison the softmax.
        self.kv_caches = [
            torch.zeros(shape, dtype=dtype, device=self.device)
            for _ in range(self.config.num_hidden_layers)
        ]

    def free_kv_cache(self) -> None:
        if self.graphs is not None:
            self.graphs.drop()  # they point into the cache
        self.kv_caches = []

    # ---- one step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, step: ExecuteModel) -> ModelOutput:
        """Run a step to its end (the in-process executor, benchmarks, tests)."""
        return self.finish(self.launch(step))

    def must_finish_first(self, step: ExecuteModel, pending: PendingStep) -> bool:
        """Whether `step` reads tokens `pending` is still sampling (penalties and the like
        look at every generated token on the host): then `pending` must finish first."""
        reads = self.batch.reads_output
        slots = np.asarray(step.slots, np.int64)
        slots = slots[slots < len(reads)]  # `step`'s new slots may lie past the batch's rows
        return bool(np.isin(slots[reads[slots]], pending.slots).any())

    @torch.inference_mode()
    def launch(self, step: ExecuteModel) -> PendingStep:
        """Apply a step and queue all its device work, without waiting for the device.

        The tokens it samples are known on the device at once: a step launched before this
        one finished reads them from there (`_last_sampled`), so the host prepares step N+1
        while the device runs step N. `finish` brings the results to the host.
        """
        if self.pooler is not None:  # before `apply`: a new request may reuse the slot
            for slot in step.finished_slots:
                self.pooler.drop(slot)
        self.batch.apply(step, self._new_state)
        if not step.slots:
            return PendingStep()
        inputs = self.batch.prepare(step.slots, step.num_scheduled_tokens)
        prompt_rows = self._plan_prompt_logprobs(inputs)
        pooling = self.batch.pooling[inputs.slots]
        sample_index = np.flatnonzero(inputs.ends & ~pooling)

        # Host->device copies are queued without waiting; device->host copies are queued
        # too, and read in `finish` once the step's event says they ran.
        graph_size = self.graphs.size_for(inputs) if self.graphs is not None else None
        if pooling.any() or prompt_rows:
            graph_size = None
        every_row_samples = len(sample_index) == len(inputs.input_ids)  # decodes
        if not every_row_samples:
            last_rows = inputs.query_start[sample_index + 1] - 1
            sample_t = transfer.to_device(last_rows, torch.long, self.device)
        for rows in prompt_rows:
            rows.targets_t = transfer.to_device(rows.targets, torch.long, self.device)
        # A step whose every row samples is all single-token chunks: its slots, on the device
        # once, serve both its input ids and the record of what it samples.
        slots_t = None
        if every_row_samples:
            slots_t = transfer.to_device(inputs.slots, torch.long, self.device)
        replayed = None
        if graph_size is not None:
            self._input_ids(inputs, self.graphs.input_ids[: len(inputs.slots)], slots_t)
            replayed = self.graphs.replay(inputs, graph_size)
            hidden = replayed.hidden
        else:
            ids_t = torch.empty(len(inputs.input_ids), **self._long)
            self._input_ids(inputs, ids_t, slots_t)
            pos_t = transfer.to_device(inputs.positions, torch.long, self.device)
            meta = self.attn_backend.build_metadata(inputs)
            hidden = self.model(ids_t, pos_t, self.kv_caches, meta)
        prompt_parts = {rows.slot: self._prompt_logprobs(hidden, rows) for rows in prompt_rows}
        pooled = {}
        if pooling.any() and self.samples:
            pooled = self._require_pooler().pool(hidden, self._pool_chunks(inputs, pooling))
        pending = PendingStep(prompt_parts=prompt_parts, pooled=pooled)
        if len(sample_index):
            slots = inputs.slots[sample_index]
            greedy = None
            if replayed is not None and replayed.logits is not None:  # every row samples
                logits, greedy = replayed.logits, replayed.greedy
            else:
                sample_rows = hidden if every_row_samples else hidden[sample_t]
                logits = self.model.logits(sample_rows)  # None on ranks other than 0
            token_ids, pending.gathered = self._sample(logits, slots, greedy)
            self._remember(slots, token_ids, slots_t)
            pending.slots = slots
            pending.states = [self.batch.states[s] for s in slots.tolist()]
            pending.positions = self.batch.reserve_tokens(slots)
            pending.tokens = transfer.to_host((token_ids,))[0]
            if pending.gathered is not None:
                ks = [state.sampling_params.logprobs for state in pending.states]
                pending.logprob_ks = ks
        if self.device.type == "cuda":
            pending.event = torch.cuda.Event()
            pending.event.record()
        return pending

    def finish(self, pending: PendingStep) -> ModelOutput:
        """Wait for a launched step; write its tokens into the batch; its output."""
        if pending.event is not None:
            pending.event.synchronize()
        sampled: list[int] = pending.tokens.tolist() if pending.tokens is not None else []
        if sampled:
            self.batch.fill_tokens(pending.slots, pending.positions, pending.states, sampled)
        logprobs: list[Logprobs | None] = []
        if pending.gathered is not None:
            logprobs = _split(pending.gathered, pending.logprob_ks, self._top_k)
        prompt_logprobs = {
            slot: _to_logprobs(parts) for slot, parts in pending.prompt_parts.items() if parts
        }
        return ModelOutput(
            sampled_token_ids=sampled,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            pooled=pending.pooled,
        )

    def _input_ids(
        self, inputs: StepInputs, ids_t: torch.Tensor, slots_t: torch.Tensor | None
    ) -> None:
        """The step's token ids, written into `ids_t` on the device; a token a launched step
        is still sampling (-1 on the host) comes from that step's result on the device.
        `slots_t`: the step's slots on the device, when every row is a single-token chunk."""
        missing = inputs.input_ids < 0
        if slots_t is not None and missing.all():  # decodes of tokens still being sampled
            torch.index_select(self._last_sampled, 0, slots_t, out=ids_t)
            return
        transfer.copy_into(ids_t, inputs.input_ids)
        rows = np.flatnonzero(missing)
        if len(rows):
            slots = np.repeat(inputs.slots, inputs.num_scheduled)[rows]
            rows_t = transfer.to_device(rows, torch.long, self.device)
            row_slots_t = transfer.to_device(slots, torch.long, self.device)
            ids_t.index_copy_(0, rows_t, self._last_sampled.index_select(0, row_slots_t))

    def _remember(
        self, slots: np.ndarray, token_ids: torch.Tensor, slots_t: torch.Tensor | None = None
    ) -> None:
        """Each slot's newest sampled token, on the device (for a step launched before this
        one finishes). `slots_t`: `slots` already on the device."""
        rows = len(self.batch.states)
        if self._last_sampled.numel() < rows:
            grown = torch.zeros(rows, dtype=torch.long, device=self.device)
            grown[: self._last_sampled.numel()] = self._last_sampled
            self._last_sampled = grown
        if slots_t is None:
            slots_t = transfer.to_device(slots, torch.long, self.device)
        self._last_sampled.index_copy_(0, slots_t, token_ids)

    def _new_state(self, new: NewRequest) -> SlotState:
        params = new.sampling_params
        if new.pooling_params is not None:
            self._require_pooler().add(new.slot, new.pooling_params, len(new.prompt_token_ids))
        generator = None
        if params is not None and params.seed is not None and not params.greedy and self.samples:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        return SlotState(params, new.pooling_params, new.prompt_token_ids, generator)

    def _sample(
        self, logits: torch.Tensor | None, slots: np.ndarray, greedy: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Sampled ids `[S]` on the device (every rank), and the logprobs asked for (rank 0).
        `greedy`: the logits' argmax, when a CUDA graph already computed it."""
        gathered = None
        if not self.samples:
            token_ids = torch.empty(len(slots), dtype=torch.long, device=self.device)
        elif self.batch.plain_greedy[slots].all():
            token_ids = greedy if greedy is not None else self.sampler.argmax(logits)
        else:
            states = [self.batch.states[s] for s in slots.tolist()]
            rows = [
                SamplingRequest(
                    state.sampling_params,
                    state.prompt_token_ids,
                    self.batch.output_token_ids(slot) if state.reads_output_tokens else [],
                    state.generator,
                    self.config.eos_token_ids,
                )
                for slot, state in zip(slots.tolist(), states)
            ]
            out = self.sampler(logits, rows)
            token_ids = out.token_ids
            gathered = self._gather_sample_logprobs(out.logprobs, token_ids, states)
        if tp_size() > 1:
            dist.broadcast(token_ids, src=0)
        return token_ids, gathered

    def _pool_chunks(self, inputs: StepInputs, pooling: np.ndarray) -> PoolingChunks:
        i = np.flatnonzero(pooling)
        return PoolingChunks(
            inputs.slots[i],
            inputs.query_start[i],
            inputs.num_scheduled[i],
            inputs.start[i],
            inputs.ends[i],
        )

    def _require_pooler(self) -> Pooler:
        if self.pooler is None:
            raise ValueError("a pooling request reached an engine that does not pool")
        return self.pooler

    # ---- logprobs ------------------------------------------------------------------------------

    def _top_k(self, k: int) -> int:
        return self.config.vocab_size if k == -1 else min(k, self.config.vocab_size)

    def _gather_sample_logprobs(
        self, raw: torch.Tensor | None, token_ids: torch.Tensor, states: list[SlotState]
    ) -> tuple[torch.Tensor, ...] | None:
        """Chosen token + top-k of the raw distribution for the whole batch, on the device."""
        if raw is None:
            return None
        ks = [s.sampling_params.logprobs for s in states]
        k_max = max(self._top_k(k) for k in ks if k is not None)
        return transfer.to_host(gather_logprobs(raw, token_ids, k_max))

    def _plan_prompt_logprobs(self, inputs: StepInputs) -> list[_PromptRows]:
        """Per request that asked for prompt logprobs: the rows of its chunk whose next token
        is a prompt token not yet scored.

        Position p predicts prompt token p + 1; a recomputed chunk (after preemption) scores
        nothing twice.
        """
        planned = []
        for i in np.flatnonzero(self.batch.prompt_logprobs[inputs.slots]).tolist():
            slot = int(inputs.slots[i])
            state = self.batch.states[slot]
            start = int(inputs.start[i])
            prompt = state.prompt_token_ids
            first = max(start, state.next_prompt_logprob - 1)
            end = min(start + int(inputs.num_scheduled[i]), len(prompt) - 1)
            if first >= end:
                continue
            state.next_prompt_logprob = end + 1
            rows = _PromptRows(
                slot=slot,
                first_row=int(inputs.query_start[i]) + first - start,
                targets=prompt[first + 1 : end + 1],
                k=self._top_k(state.sampling_params.prompt_logprobs),
            )
            planned.append(rows)
        return planned

    def _prompt_logprobs(
        self, hidden: torch.Tensor, rows: _PromptRows
    ) -> list[tuple[torch.Tensor, ...]]:
        """Chosen + top-k logprobs of the rows predicting prompt tokens, left on the device."""
        targets = rows.targets_t
        parts = []
        for lo in range(0, len(rows.targets), PROMPT_LOGPROBS_ROWS):
            hi = min(lo + PROMPT_LOGPROBS_ROWS, len(rows.targets))
            h = hidden[rows.first_row + lo : rows.first_row + hi]
            logits = self.model.logits(h)  # every rank: it gathers on rank 0
            if logits is None:
                continue
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            parts.append(transfer.to_host(gather_logprobs(logprobs, targets[lo:hi], rows.k)))
        return parts


def _split(
    gathered: tuple[torch.Tensor, ...], ks: list[int | None], top_k
) -> list[Logprobs | None]:
    """One row per request, trimmed to the k it asked for (None: it asked for none)."""
    ids, values, ranks = (t.tolist() for t in gathered)
    out: list[Logprobs | None] = []
    for i, k in enumerate(ks):
        if k is None:
            out.append(None)
            continue
        width = 1 + top_k(k)
        out.append(
            Logprobs(token_ids=[ids[i][:width]], logprobs=[values[i][:width]], ranks=[ranks[i]])
        )
    return out


def _to_logprobs(parts: list[tuple[torch.Tensor, ...]]) -> Logprobs:
    out = Logprobs(token_ids=[], logprobs=[], ranks=[])
    for ids, values, ranks in parts:
        out.token_ids.extend(ids.tolist())
        out.logprobs.extend(values.tolist())
        out.ranks.extend(ranks.tolist())
    return out
