"""Requests end cleanly however the caller leaves, and engines start and stop cleanly.

Aborts run against one shared in-process engine: every way of abandoning a request must
free its KV blocks (`get_stats().kv_blocks_used`). Create/shutdown cycles and exit
without shutdown run in their own processes (tests/scripts/lifecycle_scenarios.py).
"""

from __future__ import annotations

import asyncio
import os
import time

import psutil
import pytest
from scripts.scenario_process import ScenarioProcess, tiny_async_engine

from zllm import AsyncLLM, SamplingParams

LONG = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)
SHORT = SamplingParams(max_tokens=8, temperature=0)
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def scenarios(tiny_checkpoints):
    model = tiny_checkpoints["llama"]
    procs = {
        name: ScenarioProcess("lifecycle_scenarios.py", name, model)
        for name in ("cycles", "atexit")
    }
    yield procs
    for proc in procs.values():
        proc.kill()


@pytest.fixture(scope="module")
def engine(tiny_checkpoints, scenarios):
    engine = tiny_async_engine(tiny_checkpoints["llama"])
    yield engine
    engine.shutdown()


async def _idle(engine: AsyncLLM, within_s: float = 2.0) -> float:
    """Seconds until the engine holds no request and no KV block; fails after `within_s`."""
    start = time.monotonic()
    while True:
        stats = await engine.get_stats()
        if stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0:
            return time.monotonic() - start
        assert time.monotonic() - start < within_s, f"still busy: {stats}"
        await asyncio.sleep(0.01)


async def _first_output(engine: AsyncLLM, prompt: str, request_id: str, started: asyncio.Event):
    async for out in engine.generate(prompt, LONG, request_id):
        started.set()
        if out.finished:
            return out
    return None


async def _final(engine: AsyncLLM, prompt: str, request_id: str | None = None):
    final = None
    async for out in engine.generate(prompt, SHORT, request_id):
        final = out
    return final


# ---- aborts --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_abort_ends_the_stream_and_frees_blocks_at_once(engine):
    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(_first_output(engine, "Abort me", "victim", started))
        await started.wait()
        assert (await engine.get_stats()).kv_blocks_used > 0
        await engine.abort("victim")
        stats = await engine.get_stats()  # answered after the abort, before the next step
        assert stats.kv_blocks_used == 0 and stats.num_running == 0
        out = await asyncio.wait_for(task, 10)
        assert out.finished and out.outputs[0].finish_reason == "abort"

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_cancelling_the_consumer_aborts_at_once(engine):
    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(_first_output(engine, "Cancel me", "cancelled", started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = await engine.get_stats()
        assert stats.kv_blocks_used == 0 and stats.num_running == 0

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_breaking_out_of_async_for_aborts(engine):
    async def main():
        async for _ in engine.generate("Break out", LONG, "broken"):
            break
        await _idle(engine)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_closed_loop_aborts_its_requests(engine):
    loop = asyncio.new_event_loop()
    stream = engine.generate("Orphaned", LONG, "orphan")
    first = loop.run_until_complete(anext(stream))
    assert not first.finished
    loop.close()  # no shutdown_asyncgens: the generator is left suspended, never to resume
    asyncio.run(_idle(engine))
    del stream


@pytest.mark.timeout(60)
def test_duplicate_live_request_id_is_refused_and_reusable_after_abort(engine):
    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(_first_output(engine, "First owner", "dup", started))
        await started.wait()
        with pytest.raises(ValueError, match="'dup' is already in use"):
            await anext(engine.generate("Second owner", LONG, "dup"))
        await engine.abort("dup")
        # reused at once: the new request must not see the old one's late tokens
        reused = await _final(engine, "Second owner", "dup")
        fresh = await _final(engine, "Second owner")
        assert reused.outputs[0].token_ids == fresh.outputs[0].token_ids
        assert (await task).outputs[0].finish_reason == "abort"

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_100_abandoned_streams_leave_no_kv_blocks(engine):
    async def main() -> float:
        started = [asyncio.Event() for _ in range(100)]

        async def leave_by_break(i: int) -> None:
            n = 0
            async for out in engine.generate(f"Stream {i} breaks", LONG, f"b{i}"):
                assert not out.finished
                started[i].set()
                n += 1
                if n == 2:
                    break

        tasks = [
            asyncio.create_task(
                leave_by_break(i)
                if i % 2
                else _first_output(engine, f"Stream {i} is cancelled", f"c{i}", started[i])
            )
            for i in range(100)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        assert (await engine.get_stats()).kv_blocks_used > 0
        for task in tasks[::2]:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(d, asyncio.CancelledError) for d in done[::2])
        assert all(d is None for d in done[1::2])
        return await _idle(engine)

    asyncio.run(main())


# ---- engines in their own processes ------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_five_create_shutdown_cycles_leak_nothing(scenarios):
    result = scenarios["cycles"].result(TIMEOUT_S)
    assert result["leftovers"] == []
    rss = result["rss_mb"]
    # the first cycle pays for imports and caches; after it, memory stays flat
    assert max(rss[1:]) - rss[1] < 16, rss


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_exit_without_shutdown_stops_the_engine(scenarios):
    proc = scenarios["atexit"]
    result = proc.result(TIMEOUT_S)
    code, out, _ = proc.finish(TIMEOUT_S)
    assert code == 0
    assert '{"core_alive_after_atexit": false}' in out  # stopped by zllm's exit hook
    assert not os.path.exists(result["ipc_dir"])
    assert not psutil.pid_exists(result["core"]) or (
        psutil.Process(result["core"]).status() == psutil.STATUS_ZOMBIE
    )
