"""`EngineRouter` over two spawned replicas of a tiny model: prefix affinity keeps a shared
prefix's requests on the replica that cached it (hit rate from both engines' stats, against
random routing over the same replicas), and a SIGKILLed replica fails only its own streams,
quickly, while later requests succeed on the survivor."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from scripts.scenario_process import single_threaded_engines

from zllm.frontend.async_llm import AsyncLLM
from zllm.frontend.engine_router import EngineRouter
from zllm.frontend.errors import EngineDeadError
from zllm.frontend.replica_policy import ReplicaPolicy
from zllm.protocol.config import EngineArgs
from zllm.protocol.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)
GROUPS, PER_GROUP, PREFIX, SUFFIX = 8, 16, 500, 4


@pytest.fixture(scope="module")
def replicas(tiny_checkpoints):
    args = EngineArgs(
        model=tiny_checkpoints["llama"],
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=2**25,
        max_model_len=1024,
    )
    with single_threaded_engines():
        engines = [AsyncLLM(args) for _ in range(2)]
    yield engines
    for engine in engines:
        engine.shutdown()


async def _hit_rate(router: EngineRouter, first_token: int) -> float:
    """8 groups x 16 requests sharing a 500-token prefix per group: the prefix-cache hit rate
    summed over both replicas. Requests go out interleaved across groups (one of each group,
    then the next), the first of each group alone before the rest."""
    before = await router.get_stats()
    params = SamplingParams(max_tokens=1)

    def prompt(group: int, i: int) -> dict:
        prefix = [first_token + group * PREFIX + t for t in range(PREFIX)]
        return {"prompt_token_ids": prefix + [5 + i] * SUFFIX}

    async def one(group: int, i: int) -> None:
        async for _ in router.generate(prompt(group, i), params):
            pass

    await asyncio.gather(*(one(g, 0) for g in range(GROUPS)))
    await asyncio.gather(*(one(g, i) for i in range(1, PER_GROUP) for g in range(GROUPS)))
    after = await router.get_stats()
    queries = sum(a.prefix_cache_queries - b.prefix_cache_queries for a, b in zip(after, before))
    hits = sum(a.prefix_cache_hits - b.prefix_cache_hits for a, b in zip(after, before))
    return hits / queries


def test_prefix_affinity_beats_random_routing(replicas):
    def routed(affinity: bool) -> EngineRouter:
        return EngineRouter({"m": replicas}, lambda: ReplicaPolicy(affinity=affinity, seed=0))

    async def run() -> tuple[float, float]:
        # Distinct prefixes per run: the second run finds nothing of the first in the caches.
        return await _hit_rate(routed(True), 100), await _hit_rate(routed(False), 100 + 8192)

    with_affinity, at_random = asyncio.run(run())
    print(f"prefix-cache hit rate: affinity {with_affinity:.3f}, random {at_random:.3f}")
    assert with_affinity >= 0.90
    assert at_random < with_affinity - 0.03


def test_killed_replica_fails_its_streams_within_2s_and_survivor_serves(replicas):
    router = EngineRouter({"m": replicas})
    params = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)
    victim = router.models["m"].replicas[0]

    async def run() -> dict:
        started = asyncio.Semaphore(0)
        ended: dict[str, tuple[float, BaseException | None]] = {}

        async def stream(i: int) -> None:
            rid = f"r{i}"
            try:
                first = True
                async for _ in router.generate(f"Story {i}:", params, rid):
                    if first:
                        first = False
                        started.release()
                ended[rid] = (time.monotonic(), None)
            except EngineDeadError as e:
                ended[rid] = (time.monotonic(), e)

        tasks = [asyncio.create_task(stream(i)) for i in range(8)]
        for _ in tasks:
            await asyncio.wait_for(started.acquire(), 60)
        on_victim = set(victim.in_flight)
        killed = time.monotonic()
        os.kill(victim.engine.client.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        later = []
        for i in range(2):
            later.append([o.outputs[0].text async for o in router.generate(f"After {i}:", params)])
        return {"ended": ended, "killed": killed, "on_victim": on_victim, "later": later}

    result = asyncio.run(run())
    on_victim, ended = result["on_victim"], result["ended"]
    assert 0 < len(on_victim) < 8
    for rid, (when, error) in ended.items():
        if rid in on_victim:
            assert error is not None, f"{rid} on the killed replica did not fail"
            assert "replica m#0 of model 'm' died" in str(error)
            assert when - result["killed"] < 2.0, (
                f"{rid} failed {when - result['killed']:.2f} s late"
            )
        else:
            assert error is None, f"{rid} on the survivor failed: {error}"
    assert all(result["later"])
    health = router.health()["m"]
    assert health == {"healthy": True, "replicas": ["m#1"], "reconnecting": [], "dead": ["m#0"]}


def test_replicas_take_consecutive_gpus() -> None:
    from zllm.frontend.engine_router import EngineSpec
    from zllm.worker.worker import gpu_index

    spec = EngineSpec("m", EngineArgs(model="x", tensor_parallel_size=2), replicas=2)
    second = spec.replica_args(1)
    assert [gpu_index(second, rank, 4) for rank in (0, 1)] == [2, 3]
    assert [gpu_index(spec.replica_args(0), rank, 4) for rank in (0, 1)] == [0, 1]
    with pytest.raises(ValueError, match="data_parallel_rank=1.*needs GPU 2, but this host has 2"):
        gpu_index(second, 0, 2)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        EngineArgs(data_parallel_rank=-1)
