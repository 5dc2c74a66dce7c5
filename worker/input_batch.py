"""The worker's persistent batch: each request's tokens and block table, kept between steps
in preallocated host arrays indexed by the request's slot.

A request's row holds its prompt (sent once) followed by every token this worker sampled
for it, so a decode step needs no token from engine-core: the input of a request is its own
last sampled token (-1 while the step sampling it is still running: the model runner then
reads it on the device). A step (`ExecuteModel`) only changes rows: slots freed, block tables
reset (preemption) or extended, computed counts set for requests that (re)start; then
`prepare` turns the step's slots into the flat batch's inputs with a few array operations,
whatever the context length. The tables grow (doubling) if engine-core hands out more slots
than `max_num_seqs` (preempted requests keep theirs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams
from zllm.protocol.worker_messages import ExecuteModel, NewRequest, WorkerSlot


@dataclass
class SlotState:
    """What a worker remembers of a request besides its row of tokens and blocks."""

    sampling_params: SamplingParams | None  # None: a pooling request
    pooling_params: PoolingParams | None
    prompt_token_ids: list[int]
    generator: torch.Generator | None = None  # a seeded random request's own
    next_prompt_logprob: int = 1  # first prompt position whose logprob is still owed

    @property
    def reads_output_tokens(self) -> bool:
        """The sampler looks at what it generated so far (penalties, bad words, min_tokens)."""
        return self.sampling_params is not None and _reads_output_tokens(self.sampling_params)

    @property
    def plain_greedy(self) -> bool:
        """Sampling it is an argmax of the raw logits, nothing more."""
        p = self.sampling_params
        return p is not None and p.greedy and not _needs_sampler(p)


def _reads_output_tokens(p: SamplingParams) -> bool:
    return bool(
        p.min_tokens
        or p._bad_words_token_ids
        or p.repetition_penalty != 1.0
        or p.presence_penalty
        or p.frequency_penalty
    )


def _needs_sampler(p: SamplingParams) -> bool:
    return bool(
        p.logprobs is not None or p.logit_bias or p.allowed_token_ids or _reads_output_tokens(p)
    )


@dataclass
class StepInputs:
    """The flat batch of one step, as host arrays (batch order; B requests, T tokens)."""

    slots: np.ndarray  # [B]
    num_scheduled: np.ndarray  # [B] tokens computed this step
    start: np.ndarray  # [B] tokens computed before
    query_start: np.ndarray  # [B + 1] first batch row of each request
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T] KV cache slot of each token
    block_table: np.ndarray  # [B, W] the requests' block tables, W blocks covering the longest
    ends: np.ndarray  # [B] bool: the chunk reaches the end of the request's tokens

    @property
    def seq_lens(self) -> np.ndarray:
        return self.start + self.num_scheduled


class InputBatch:
    def __init__(self, num_slots: int, max_model_len: int, block_size: int) -> None:
        self.block_size = block_size
        self.max_len = max_model_len + 1  # a sampled token past the last one is still written
        self.max_blocks = -(-self.max_len // block_size)
        self.token_ids = np.zeros((0, self.max_len), np.int32)
        self.block_table = np.zeros((0, self.max_blocks), np.int32)
        self.num_tokens = np.zeros(0, np.int64)
        self.num_computed = np.zeros(0, np.int64)
        self.num_blocks = np.zeros(0, np.int64)
        self.plain_greedy = np.zeros(0, bool)
        self.reads_output = np.zeros(0, bool)  # `SlotState.reads_output_tokens`, per slot
        self.pooling = np.zeros(0, bool)
        self.prompt_logprobs = np.zeros(0, bool)
        self.states: list[SlotState | None] = []
        self._grow(max(num_slots, 1))

    def _grow(self, num_slots: int) -> None:
        old = len(self.states)

        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((num_slots, *a.shape[1:]), a.dtype)
            out[:old] = a
            return out

        self.token_ids = grown(self.token_ids)
        self.block_table = grown(self.block_table)
        self.num_tokens = grown(self.num_tokens)
        self.num_computed = grown(self.num_computed)
        self.num_blocks = grown(self.num_blocks)
        self.plain_greedy = grown(self.plain_greedy)
        self.reads_output = grown(self.reads_output)
        self.pooling = grown(self.pooling)
        self.prompt_logprobs = grown(self.prompt_logprobs)
        self.states += [None] * (num_slots - old)

    # ---- changes a step brings -------------------------------------------------------------------

    def apply(self, step: ExecuteModel, new_state) -> None:
        """Apply a step's changes. `new_state(NewRequest)` builds the state of a new request."""
        for slot in step.finished_slots:
            self.states[slot] = None
            self.reads_output[slot] = False
        for slot in step.preempted_slots:
            self.num_blocks[slot] = 0
        for new in step.new_requests:
            self._add(new, new_state(new))
        for start in step.started:
            self.num_computed[start.slot] = start.num_computed_tokens
            self.num_blocks[start.slot] = 0
        for blocks in step.new_block_ids:
            slot, first = blocks.slot, self.num_blocks[blocks.slot]
            self.block_table[slot, first : first + len(blocks.block_ids)] = blocks.block_ids
            self.num_blocks[slot] = first + len(blocks.block_ids)

    def _add(self, new: NewRequest, state: SlotState) -> None:
        if new.slot >= len(self.states):
            self._grow(max(new.slot + 1, 2 * len(self.states)))
        n = len(new.prompt_token_ids)
        self.token_ids[new.slot, :n] = new.prompt_token_ids
        self.num_tokens[new.slot] = n
        self.num_computed[new.slot] = 0
        self.num_blocks[new.slot] = 0
        self.plain_greedy[new.slot] = state.plain_greedy
        self.reads_output[new.slot] = state.reads_output_tokens
        self.pooling[new.slot] = state.pooling_params is not None
        params = state.sampling_params
        self.prompt_logprobs[new.slot] = params is not None and params.prompt_logprobs is not None
        self.states[new.slot] = state

    # ---- one step ----------------------------------------------------------------------------------

    def prepare(self, slots: list[WorkerSlot], num_scheduled: list[int]) -> StepInputs:
        """The step's inputs; the scheduled tokens then count as computed."""
        slots_a = np.asarray(slots, np.int64)
        n = np.asarray(num_scheduled, np.int64)
        start = self.num_computed[slots_a]
        query_start = np.zeros(len(n) + 1, np.int64)
        np.cumsum(n, out=query_start[1:])
        total = int(query_start[-1])
        if total == len(n):  # every request runs one token: a decode step
            positions = start.copy()
            token_slots = slots_a
        else:
            token_slots = np.repeat(slots_a, n)
            positions = np.arange(total) + np.repeat(start - query_start[:-1], n)
        bs = self.block_size
        slot_mapping = self.block_table[token_slots, positions // bs] * bs + positions % bs
        seq_lens = start + n
        width = -(-int(seq_lens.max()) // bs)
        self.num_computed[slots_a] = seq_lens
        return StepInputs(
            slots=slots_a,
            num_scheduled=n,
            start=start,
            query_start=query_start,
            input_ids=self.token_ids[token_slots, positions],
            positions=positions,
            slot_mapping=slot_mapping,
            block_table=self.block_table[slots_a, :width],
            ends=seq_lens == self.num_tokens[slots_a],
        )

    def reserve_tokens(self, slots: np.ndarray) -> np.ndarray:
        """Room for one token per slot that a launched step is sampling: -1 until it is known
        (`fill_tokens`); the positions it takes."""
        positions = self.num_tokens[slots].copy()
        self.token_ids[slots, positions] = -1
        self.num_tokens[slots] += 1
        return positions

    def fill_tokens(
        self, slots: np.ndarray, positions: np.ndarray, states: list, tokens: list[int]
    ) -> None:
        """The sampled tokens, in the rows their requests still hold (a slot finished and
        taken by a new request meanwhile keeps the new request's tokens)."""
        keep = [i for i, (s, st) in enumerate(zip(slots.tolist(), states)) if self.states[s] is st]
        if len(keep) < len(states):
            slots, positions = slots[keep], positions[keep]
            tokens = [tokens[i] for i in keep]
        self.token_ids[slots, positions] = tokens

    def output_token_ids(self, slot: WorkerSlot) -> list[int]:
        state = self.states[slot]
        return self.token_ids[slot, len(state.prompt_token_ids) : self.num_tokens[slot]].tolist()


def inputs_for_chunks(chunks: list[tuple[int, int, list[int]]], block_size: int) -> StepInputs:
    """The inputs of a one-off batch of (computed tokens, new tokens, block ids) chunks, with
    token ids 0 (attention tests and benchmarks, which bring their own q, k, v)."""
    longest = max(max(start + n, len(ids) * block_size) for start, n, ids in chunks)
    batch = InputBatch(len(chunks), longest, block_size)
    for slot, (start, n, block_ids) in enumerate(chunks):
        batch.block_table[slot, : len(block_ids)] = block_ids
        batch.num_computed[slot] = start
        batch.num_tokens[slot] = start + n
    return batch.prepare(list(range(len(chunks))), [n for _, n, _ in chunks])
