"""Engine lifecycles in a fresh process: `python lifecycle_scenarios.py SCENARIO MODEL_PATH`.

`cycles`: five create/use/shutdown cycles (`with LLM`, `async with AsyncLLM`, a second
`shutdown()`, `del llm`), measuring the frontend's RSS and looking for leftovers after each.
`atexit`: start an engine and leave without `shutdown()`; an exit hook that runs after
zllm's reports whether engine-core was still alive at that point.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import os
import sys

import psutil

LEFT_AT_EXIT: dict = {}


def _report_at_exit() -> None:  # registered first, so it runs after zllm's own exit hook
    core = LEFT_AT_EXIT.get("core")
    if core is not None:
        alive = psutil.pid_exists(core) and psutil.Process(core).status() != psutil.STATUS_ZOMBIE
        print(json.dumps({"core_alive_after_atexit": alive}), flush=True)


atexit.register(_report_at_exit)

from zllm import LLM, AsyncLLM, EngineArgs, EngineDeadError, SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=6, temperature=0)
ARGS = dict(distributed_executor_backend="uni", kv_cache_memory_bytes=2**24)


def leftovers(ipc_dir: str, pids: list[int]) -> list[str]:
    """What an engine left behind: its socket directory, live processes, shm segments."""
    found = [ipc_dir] if os.path.exists(ipc_dir) else []
    found += [f"pid {p}" for p in pids if psutil.pid_exists(p)]
    me = psutil.Process()
    found += [f"child {c.pid}" for c in me.children(recursive=True)]
    marks = [str(p) for p in [os.getpid(), *pids]] + ["zllm"]
    found += [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if any(m in n for m in marks)]
    return found


def sync_cycle(model: str) -> tuple[list[int], str, int]:
    with LLM(model, **ARGS) as llm:
        tokens = llm.generate(["Hello there"], GREEDY)[0].outputs[0].token_ids
        llm.sleep(level=1)
        assert llm.is_sleeping()
        llm.wake_up()
        assert not llm.is_sleeping()
        assert llm.generate(["Hello there"], GREEDY)[0].outputs[0].token_ids == tokens
        client = llm.client
    llm.shutdown()  # a second time: a no-op
    try:
        llm.generate(["Hello there"], GREEDY)
        raise AssertionError("generate worked after shutdown")
    except EngineDeadError:
        pass
    return tokens, client.conn.ipc_dir, client.proc.pid


def del_cycle(model: str) -> tuple[list[int], str, int]:
    """`del llm` stops the engine (vLLM users expect it to free the GPU)."""
    llm = LLM(model, **ARGS)
    tokens = llm.generate(["Hello there"], GREEDY)[0].outputs[0].token_ids
    client = llm.client
    del llm
    client.proc.wait(timeout=10)
    client.io_thread.join(timeout=10)
    return tokens, client.conn.ipc_dir, client.proc.pid


def async_cycle(model: str) -> tuple[list[int], str, int]:
    async def main() -> tuple[list[int], str, int]:
        async with AsyncLLM(EngineArgs(model=model, **ARGS)) as engine:
            final = None
            async for out in engine.generate("Hello there", GREEDY):
                final = out
            client = engine.client
        engine.shutdown()
        assert not engine.is_running and engine.errored
        return final.outputs[0].token_ids, client.conn.ipc_dir, client.proc.pid

    return asyncio.run(main())


def cycles(model: str) -> dict:
    me = psutil.Process()
    rss_mb, left, tokens = [], [], []
    for i in range(5):
        cycle = [sync_cycle, async_cycle, sync_cycle, async_cycle, del_cycle][i]
        out, ipc_dir, core = cycle(model)
        tokens.append(out)
        gc.collect()
        rss_mb.append(me.memory_info().rss / 2**20)
        left += leftovers(ipc_dir, [core])
    assert all(t == tokens[0] for t in tokens), tokens
    return {"rss_mb": rss_mb, "leftovers": left}


def leave_without_shutdown(model: str) -> dict:
    llm = LLM(model, **ARGS)
    llm.generate(["Hello there"], GREEDY)
    LEFT_AT_EXIT["core"] = llm.client.proc.pid
    LEFT_AT_EXIT["llm"] = llm  # alive until exit: only the exit hook can stop it
    return {"core": llm.client.proc.pid, "ipc_dir": llm.client.conn.ipc_dir}


if __name__ == "__main__":
    name, model_path = sys.argv[1], sys.argv[2]
    result = {"cycles": cycles, "atexit": leave_without_shutdown}[name](model_path)
    print(json.dumps({"ok": name, **result}), flush=True)
