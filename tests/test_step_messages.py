"""What crosses the engine-core -> worker boundary each step: only what changed.

The worker keeps each request's tokens and block table (`worker/input_batch.py`), so a decode
step names slots and token counts, nothing that grows with the context.
"""

from __future__ import annotations

import numpy as np
from scheduler_results import apply_results

from zllm.core.kv_cache_manager import KVCacheManager
from zllm.core.request import Request
from zllm.core.scheduler import Scheduler
from zllm.core.worker_batch import WorkerBatch
from zllm.protocol.messages import encode
from zllm.protocol.sampling_params import SamplingParams
from zllm.protocol.worker_messages import ExecuteModel, NewRequest
from zllm.worker.input_batch import InputBatch, SlotState

BLOCK = 16


def _decode_messages(
    context: int, num_requests: int = 64, steps: int = BLOCK
) -> list[ExecuteModel]:
    """`num_requests` requests whose prompts fill `context - 1` tokens; the messages of their
    first `steps` decode steps (the first one attends over `context` tokens)."""
    kv = KVCacheManager(num_requests * (context // BLOCK + 2), BLOCK)
    sched = Scheduler(kv, num_requests, max_num_batched_tokens=1 << 20, enable_chunked_prefill=True)
    batch = WorkerBatch(kv)
    for i in range(num_requests):
        prompt = [(7 * i + j) % 30000 for j in range(context - 1)]
        sched.add(Request(f"c/{i}", b"c", str(i), prompt, SamplingParams(max_tokens=64), [2], 8192))
    messages = []
    for _ in range(1 + steps):
        step = sched.schedule()
        message, _ = batch.build(step)
        messages.append(message)
        apply_results(
            sched, step, {r.key: 5 for r, ends in zip(step.requests, step.ends_tokens) if ends}
        )
    return messages[1:]


def test_a_decode_step_does_not_grow_with_the_context() -> None:
    short, long = _decode_messages(100), _decode_messages(4000)
    sizes = [len(encode(m)) for m in short], [len(encode(m)) for m in long]
    assert sizes[0][0] == sizes[1][0] < 200  # 64 slots, 64 ones and a few bytes of framing
    assert all(m.num_scheduled_tokens == [1] * 64 and not m.new_requests for m in long)
    # Once every 16 steps each request crosses into a new block and the step carries its id:
    # at any context, the same step count of the same size.
    assert sorted(sizes[0]) == sorted(sizes[1])
    assert sum(bool(m.new_block_ids) for m in long) == 1


def test_the_worker_rebuilds_a_decode_from_its_own_tokens() -> None:
    """Prefill two prompts, sample, then decode from a message with no token ids: the inputs
    are the tokens the worker sampled, at the next positions, in the right KV slots."""
    batch = InputBatch(num_slots=1, max_model_len=64, block_size=4)  # grows to slot 1
    greedy = SamplingParams(max_tokens=8)
    prefill = ExecuteModel(
        new_requests=[
            NewRequest(slot=0, prompt_token_ids=[11, 12, 13, 14, 15], sampling_params=greedy),
            NewRequest(slot=1, prompt_token_ids=[21, 22], sampling_params=greedy),
        ],
        started=[],
    )
    batch.apply(prefill, lambda new: SlotState(new.sampling_params, None, new.prompt_token_ids))
    for slot, blocks in ((0, [7, 3]), (1, [9])):
        batch.num_computed[slot] = 0
        batch.block_table[slot, : len(blocks)] = blocks
        batch.num_blocks[slot] = len(blocks)
    first = batch.prepare([0, 1], [5, 2])
    assert first.input_ids.tolist() == [11, 12, 13, 14, 15, 21, 22]
    assert first.positions.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert first.slot_mapping.tolist() == [28, 29, 30, 31, 12, 36, 37]
    assert first.ends.tolist() == [True, True]
    sampling = np.array([0, 1])
    positions = batch.reserve_tokens(sampling)  # the step that samples them is running
    assert batch.prepare([1], [1]).input_ids.tolist() == [-1]  # read on the device instead
    batch.num_computed[1] -= 1
    states = [batch.states[0], batch.states[1]]
    batch.fill_tokens(sampling, positions, states, [99, 98])
    decode = batch.prepare([1, 0], [1, 1])
    assert decode.input_ids.tolist() == [98, 99]
    assert decode.positions.tolist() == [2, 5]
    assert decode.slot_mapping.tolist() == [38, 13]
    assert decode.block_table.tolist() == [[9, 0], [7, 3]]
    assert batch.output_token_ids(0) == [99]
