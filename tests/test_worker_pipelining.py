"""A worker launches step N+1 before step N finished (`ModelRunner.launch` / `finish`): the
tokens N samples reach N+1 on the device, and the outputs equal running each step to its
end first. A slot freed and taken by a new request meanwhile keeps the new request's tokens;
a step whose sampler reads earlier tokens (penalties) waits for them."""

from __future__ import annotations

import pytest
from conftest import build_tiny_checkpoint

from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.sampling_params import SamplingParams
from zllm.protocol.worker_messages import ExecuteModel, NewBlocks, NewRequest, SlotStart
from zllm.worker.worker import Worker

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 41)), [3] * 9]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(build_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("pipe") / "m", None))


def make_worker(path: str) -> Worker:
    args = EngineArgs(model=path, dtype="float32", max_num_seqs=4, max_model_len=128)
    worker = Worker(args, ModelConfig.from_path(path, max_model_len=128))
    worker.init_kv_cache(64)
    return worker


def prefill(slots: list[int], prompts: list[list[int]], params=GREEDY) -> ExecuteModel:
    return ExecuteModel(
        new_requests=[
            NewRequest(slot=s, prompt_token_ids=p, sampling_params=params)
            for s, p in zip(slots, prompts)
        ],
        started=[SlotStart(s, 0) for s in slots],
        new_block_ids=[NewBlocks(s, [8 * s + b for b in range(8)]) for s in slots],
        slots=slots,
        num_scheduled_tokens=[len(p) for p in prompts],
    )


def decode(slots: list[int], **changes) -> ExecuteModel:
    return ExecuteModel(slots=slots, num_scheduled_tokens=[1] * len(slots), **changes)


def run(worker: Worker, steps: list[ExecuteModel], overlap: bool) -> list[list[int]]:
    """Each step's sampled ids; with `overlap`, step N+1 launches before N finishes."""
    if not overlap:
        return [worker.execute_model(s).sampled_token_ids for s in steps]
    outputs, pending = [], None
    for step in steps:
        if pending is not None and worker.must_finish_first(step, pending):
            outputs.append(worker.finish_step(pending).sampled_token_ids)
            pending = None
        launched = worker.launch_step(step)
        if pending is not None:
            outputs.append(worker.finish_step(pending).sampled_token_ids)
        pending = launched
    outputs.append(worker.finish_step(pending).sampled_token_ids)
    return outputs


def test_launching_ahead_gives_the_same_tokens(checkpoint) -> None:
    steps = [prefill([0, 1, 2], PROMPTS)] + [decode([0, 1, 2]) for _ in range(6)]
    expected = run(make_worker(checkpoint), steps, overlap=False)
    worker = make_worker(checkpoint)
    assert run(worker, steps, overlap=True) == expected
    tokens = [row[0] for row in expected]
    assert worker.runner.batch.output_token_ids(0) == tokens  # filled in place of the -1s


def test_a_reused_slot_keeps_the_new_requests_tokens(checkpoint) -> None:
    """Slot 1 finishes in the step launched while its last token is still being sampled,
    and a new request takes it in that same step: the old token's position (6) lies inside
    the new prompt, which must stay as it is."""
    reuse = prefill([1], [[9, 9, 8, 7, 6, 5, 4, 3]])
    steps = [
        prefill([0, 1], [PROMPTS[1], PROMPTS[0]]),
        decode([0, 1]),
        ExecuteModel(
            finished_slots=[1],
            new_requests=reuse.new_requests,
            started=reuse.started,
            new_block_ids=reuse.new_block_ids,
            slots=[0, 1],
            num_scheduled_tokens=[1, 8],
        ),
        decode([0, 1]),
        decode([0, 1]),
    ]
    expected = run(make_worker(checkpoint), steps, overlap=False)
    worker = make_worker(checkpoint)
    assert run(worker, steps, overlap=True) == expected
    batch = worker.runner.batch
    assert batch.token_ids[1, :8].tolist() == [9, 9, 8, 7, 6, 5, 4, 3]
    assert batch.output_token_ids(1) == [expected[2][1], expected[3][1], expected[4][1]]


def test_penalties_wait_for_the_tokens_they_read(checkpoint) -> None:
    penalised = SamplingParams(
        max_tokens=64, temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5
    )
    steps = [prefill([0, 1], PROMPTS[:2], penalised)] + [decode([0, 1]) for _ in range(6)]
    worker = make_worker(checkpoint)
    pending = worker.launch_step(steps[0])
    assert worker.must_finish_first(steps[1], pending)
    worker.finish_step(pending)
    assert not make_worker(checkpoint).must_finish_first(steps[1], pending)  # other batch
    expected = run(make_worker(checkpoint), steps, overlap=False)
    assert run(make_worker(checkpoint), steps, overlap=True) == expected
