"""Processes dying under a running engine, one scenario per process.

`python fault_scenarios.py SCENARIO MODEL_PATH` prints JSON lines. `kill_worker`, `kill_rank`
(rank 1 of 2) and `kill_core` SIGKILL a process of a live multi-process engine while 8
streams generate and report how each caller learned of it; `frontend` prints its engine's
pids once generation runs and then keeps generating until the test SIGKILLs it. The prompts
are token ids and the engine loads no tokenizer, so any checkpoint will do (one without a
tokenizer too: a GPU machine cannot fetch the default model's).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import psutil

from zllm import AsyncLLM, EngineArgs, EngineDeadError, SamplingParams

LONG = SamplingParams(max_tokens=900, ignore_eos=True, temperature=0, detokenize=False)


def prompt(i: int) -> dict:
    return {"prompt_token_ids": [10 + i, 20, 30, 40, 50]}


def make_engine(model: str, tensor_parallel_size: int = 1) -> AsyncLLM:
    return AsyncLLM(  # "mp": real workers
        EngineArgs(
            model=model,
            kv_cache_memory_bytes=2**24,
            tensor_parallel_size=tensor_parallel_size,
            skip_tokenizer_init=True,
        )
    )


def engine_pids(engine: AsyncLLM) -> tuple[int, list[int]]:
    core = engine.client.proc.pid
    return core, [p.pid for p in psutil.Process(core).children()]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float) -> float | None:
    """Seconds until every pid is gone, or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if all(gone(p) for p in pids):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


async def kill_during_streams(engine: AsyncLLM, victim: int, stuck: int | None = None) -> dict:
    """SIGKILL `victim` while 8 streams run (after SIGSTOPping `stuck`, if given)."""
    started = [asyncio.Event() for _ in range(8)]

    async def consume(i: int) -> dict:
        try:
            async for out in engine.generate(prompt(i), LONG, f"s{i}"):
                started[i].set()
                if out.finished:
                    return {"outcome": "finished"}
        except EngineDeadError as e:
            return {"outcome": "dead", "at": time.monotonic(), "error": str(e)}
        return {"outcome": "ended"}

    tasks = [asyncio.create_task(consume(i)) for i in range(8)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
    if stuck is not None:
        os.kill(stuck, signal.SIGSTOP)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for r in results:
        if "at" in r:
            r["latency_s"] = r.pop("at") - killed_at

    after: dict = {"errored": engine.errored, "is_running": engine.is_running}
    after["dead_error"] = f"{type(engine.dead_error).__name__}: {engine.dead_error}"
    for name, call in {
        "check_health": engine.check_health,
        "get_stats": engine.get_stats,
        "generate": lambda: anext(engine.generate(prompt(8), LONG)),
    }.items():
        start = time.monotonic()
        try:
            await asyncio.wait_for(call(), 5)
            after[name] = "no error"
        except EngineDeadError as e:
            after[name] = f"EngineDeadError in {time.monotonic() - start:.3f}s: {e}"
    return {"streams": results, "after": after}


def kill_worker(model: str) -> dict:
    engine = make_engine(model)
    core, workers = engine_pids(engine)
    result = asyncio.run(kill_during_streams(engine, workers[0]))
    result["core_gone_s"] = wait_gone([core], 10)
    engine.shutdown()
    return result


def kill_rank(model: str) -> dict:
    """Tensor parallel: SIGKILL rank 1 while rank 0 is stuck. On NCCL rank 0 then spins in
    a collective that never ends (gloo would fail it after a while): SIGSTOP makes the CPU
    run the same, a rank that answers nothing and exits only when killed."""
    engine = make_engine(model, tensor_parallel_size=2)
    core, workers = engine_pids(engine)
    result = asyncio.run(kill_during_streams(engine, workers[1], stuck=workers[0]))
    result["all_gone_s"] = wait_gone([core, *workers], 10)
    engine.shutdown()
    return result


def kill_core(model: str) -> dict:
    engine = make_engine(model)
    core, workers = engine_pids(engine)
    result = asyncio.run(kill_during_streams(engine, core))
    result["workers_gone_s"] = wait_gone(workers, 10)
    engine.shutdown()
    return result


def frontend(model: str) -> None:
    """Generate forever; tell the test our engine's pids once tokens flow."""
    engine = make_engine(model)
    core, workers = engine_pids(engine)

    async def main() -> None:
        told = False
        while True:
            async for _ in engine.generate(prompt(9), LONG):
                if not told:
                    info = {"frontend": os.getpid(), "core": core, "workers": workers}
                    print(json.dumps(info), flush=True)
                    told = True

    asyncio.run(main())


if __name__ == "__main__":
    name, model_path = sys.argv[1], sys.argv[2]
    scenarios = {"kill_worker": kill_worker, "kill_rank": kill_rank, "kill_core": kill_core}
    outcome = {**scenarios, "frontend": frontend}[name](model_path)
    print(json.dumps({"ok": name, **(outcome or {})}), flush=True)
