"""What the workers' persistent batch holds, seen from engine-core: which slot each request
has, and how many of its block ids each worker has been told. From a `ScheduledStep` it
builds the `ExecuteModel` that carries only the difference.

A request gets a slot (the smallest free one) the first time it is scheduled, keeps it
while preempted, and frees it when it finishes; the worker drops the slot's state in the
next step, before it reads that step's new requests, so a slot may change hands within one
message.
"""

from __future__ import annotations

import heapq

from zllm.core.kv_cache_manager import KVCacheManager
from zllm.core.scheduler import ScheduledStep
from zllm.protocol.worker_messages import (
    ExecuteModel,
    NewBlocks,
    NewRequest,
    SlotStart,
    WorkerSlot,
)


class WorkerBatch:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.slots: dict[str, WorkerSlot] = {}  # engine key -> worker slot
        self.blocks_sent: dict[str, int] = {}  # key -> block ids the workers hold (absent: none)
        self._free: list[WorkerSlot] = []  # a heap of freed slots
        self._next_slot = 0
        self._finished: list[WorkerSlot] = []  # not yet told (a step with no requests sends none)
        self._preempted: list[WorkerSlot] = []

    @property
    def num_slots(self) -> int:
        """Slots handed out so far: the size the workers' tables grow to."""
        return self._next_slot

    def build(self, step: ScheduledStep) -> tuple[ExecuteModel, list[WorkerSlot]]:
        """The step's message, and the slot of each of its requests (in batch order)."""
        for key in step.preempted_keys:
            if key in self.slots and self.blocks_sent.pop(key, None) is not None:
                self._preempted.append(self.slots[key])
        for key in step.finished_keys:
            slot = self.slots.pop(key, None)
            if slot is not None:
                if self.blocks_sent.pop(key, None) is None and slot in self._preempted:
                    self._preempted.remove(slot)  # finished while preempted: dropping is enough
                self._finished.append(slot)
                heapq.heappush(self._free, slot)
        if not step.requests:
            return ExecuteModel(), []
        message = ExecuteModel(finished_slots=self._finished, preempted_slots=self._preempted)
        self._finished, self._preempted = [], []
        slot_of, blocks_sent, block_ids_of = self.slots, self.blocks_sent, self.kv.block_ids
        for request, num_tokens in zip(step.requests, step.num_tokens):
            key = request.key
            slot = slot_of.get(key)
            if slot is None:
                slot = slot_of[key] = self._take_slot()
                message.new_requests.append(
                    NewRequest(
                        slot=slot,
                        prompt_token_ids=request.prompt_token_ids,
                        sampling_params=request.sampling_params,
                        pooling_params=request.pooling_params,
                    )
                )
            sent = blocks_sent.get(key)
            if sent is None:  # (re)enters the batch: from its prefix-cache hit, no blocks yet
                computed_before = request.num_computed_tokens - num_tokens  # counted at schedule
                message.started.append(SlotStart(slot, computed_before))
                sent = blocks_sent[key] = 0
            block_ids = block_ids_of(request)
            if len(block_ids) > sent:  # most decode steps take no new block
                message.new_block_ids.append(NewBlocks(slot, block_ids[sent:]))
                blocks_sent[key] = len(block_ids)
            message.slots.append(slot)
        message.num_scheduled_tokens = step.num_tokens
        return message, message.slots

    def _take_slot(self) -> WorkerSlot:
        if self._free:
            return heapq.heappop(self._free)
        self._next_slot += 1
        return self._next_slot - 1
