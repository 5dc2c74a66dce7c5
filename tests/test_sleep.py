"""Sleep mode: the engine gives its memory back and comes back producing the same tokens;
requests that arrive while it sleeps wait and are served after `wake_up`, none lost."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from scripts.scenario_process import tiny_async_engine

from zllm import AsyncLLM, EngineArgs, SamplingParams
from zllm.protocol.config import ModelConfig
from zllm.worker.worker import Worker

PROMPTS = ["The capital of France is", "One, two, three,", "Once upon a time", "def main():"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    engine = tiny_async_engine(tiny_checkpoints["llama"])
    yield engine
    engine.shutdown()


async def _tokens(engine: AsyncLLM, prompt: str, params: SamplingParams = GREEDY) -> list[int]:
    final = None
    async for out in engine.generate(prompt, params):
        final = out
    assert final.finished and final.outputs[0].finish_reason != "abort"
    return final.outputs[0].token_ids


async def _all(engine: AsyncLLM) -> list[list[int]]:
    return await asyncio.gather(*(_tokens(engine, p) for p in PROMPTS))


async def _until_waiting(engine: AsyncLLM, n: int) -> None:
    """Until the core holds `n` waiting requests (they were sent and arrived)."""
    deadline = time.monotonic() + 10
    while (await engine.get_stats()).num_waiting != n:
        assert time.monotonic() < deadline, await engine.get_stats()
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def reference(engine) -> list[list[int]]:
    return asyncio.run(_all(engine))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("level", [1, 2])
def test_requests_sent_while_asleep_complete_after_wake_up(engine, reference, level):
    async def main():
        await engine.sleep(level=level)
        assert await engine.is_sleeping()
        stats = await engine.get_stats()
        assert stats.kv_blocks_used == 0
        tasks = [asyncio.create_task(_tokens(engine, p)) for p in PROMPTS]
        await _until_waiting(engine, len(PROMPTS))
        steps = (await engine.get_stats()).num_steps
        await engine.wake_up(tags=["kv_cache"])  # weights still away: must not run yet
        assert await engine.is_sleeping()
        stats = await engine.get_stats()
        assert stats.num_steps == steps and stats.num_waiting == len(PROMPTS)
        assert not any(t.done() for t in tasks)
        await engine.wake_up(tags=["weights"])
        assert not await engine.is_sleeping()
        assert await asyncio.gather(*tasks) == reference
        assert await _all(engine) == reference

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_sleep_mid_generation_recomputes_after_wake_up(engine, tiny_checkpoints):
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)

    async def main():
        expected = await asyncio.gather(*(_tokens(engine, p, params) for p in PROMPTS))
        started = asyncio.Event()

        async def stream(prompt: str) -> list[int]:
            final = None
            async for out in engine.generate(prompt, params):
                started.set()
                final = out
            return final.outputs[0].token_ids

        tasks = [asyncio.create_task(stream(p)) for p in PROMPTS]
        await started.wait()
        await engine.sleep()  # level 1; running requests go back to waiting
        stats = await engine.get_stats()
        assert stats.num_running == 0 and stats.kv_blocks_used == 0
        assert stats.num_waiting == sum(not t.done() for t in tasks)
        await engine.wake_up()
        assert await asyncio.gather(*tasks) == expected

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_bad_sleep_arguments_are_refused(engine):
    async def main():
        with pytest.raises(ValueError, match="level"):
            await engine.sleep(level=3)
        with pytest.raises(ValueError, match="tags"):
            await engine.wake_up(tags=["everything"])
        assert not await engine.is_sleeping()

    asyncio.run(main())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("level", [1, 2])
def test_worker_drops_every_device_tensor_while_asleep(tiny_checkpoints, level):
    """What `empty_cache` needs on CUDA: no parameter, buffer or KV tensor left on the device."""
    path = tiny_checkpoints["qwen2"]  # tied embeddings: one tensor owned twice
    args = EngineArgs(model=path, device="cpu", kv_cache_memory_bytes=2**20)
    worker = Worker(args, ModelConfig.from_path(path))
    worker.init_kv_cache(worker.available_kv_blocks())
    before = {k: v.clone() for k, v in worker.model.state_dict().items()}
    assert worker.sleep(level) == ["weights", "kv_cache"]
    assert worker.runner.kv_caches == []
    assert all(t.numel() == 0 for t in worker.model.parameters())
    assert all(t.numel() == 0 for t in worker.model.buffers())
    assert (worker.host_weights is None) == (level == 2)
    assert worker.wake_up(["weights"]) == ["kv_cache"]
    assert worker.wake_up(["kv_cache"]) == []
    assert len(worker.runner.kv_caches) == worker.model_config.num_hidden_layers
    after = worker.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
