"""Event-loop scenarios that hang or fail in vLLM (seeds 000, 001), one per process.

`python loop_scenarios.py SCENARIO MODEL_PATH` prints one JSON line `{"ok": ..., ...}` on
success; any hang is caught by the caller's timeout, any failure is a traceback.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import warnings

from zllm import AsyncLLM, EngineArgs, SamplingParams

PROMPTS = ["The capital of France is", "One, two, three,", "Once upon a time", "def main():"]
GREEDY = SamplingParams(max_tokens=8, temperature=0)


def make_engine(model: str) -> AsyncLLM:
    return AsyncLLM(
        EngineArgs(model=model, distributed_executor_backend="uni", kv_cache_memory_bytes=2**24)
    )


async def one(engine: AsyncLLM, prompt: str, request_id: str) -> list[int]:
    final = None
    async for out in engine.generate(prompt, GREEDY, request_id):
        final = out
    assert final is not None and final.finished
    return final.outputs[0].token_ids


async def batch(engine: AsyncLLM, tag: str) -> list[list[int]]:
    return await asyncio.gather(*(one(engine, p, f"{tag}-{i}") for i, p in enumerate(PROMPTS)))


def five_runs(model: str) -> dict:
    """Five successive `asyncio.run()` batches on one engine (vLLM: the second one hangs)."""
    engine = make_engine(model)
    results = [asyncio.run(batch(engine, f"run{i}")) for i in range(5)]
    assert all(r == results[0] for r in results), results
    engine.shutdown()
    return {"runs": len(results), "tokens": results[0]}


def outside_loop(model: str) -> dict:
    """Built with no loop running, used inside `asyncio.run()` (vLLM: "Future attached to a
    different loop")."""
    engine = make_engine(model)

    async def main() -> dict:
        config = await engine.get_model_config()
        parallel = await engine.get_parallel_config()
        scheduler = await engine.get_scheduler_config()
        decoding = await engine.get_decoding_config()
        tokenizer = await engine.get_tokenizer()
        await engine.check_health()
        tokens = await batch(engine, "inside")
        return {
            "architecture": config.architecture,
            "tp": parallel.tensor_parallel_size,
            "max_num_seqs": scheduler.max_num_seqs,
            "max_model_len": scheduler.max_model_len,
            "decoding_backend": decoding.backend,
            "tokenizer_roundtrip": tokenizer.decode(tokenizer.encode("Paris")),
            "reset_prefix_cache": await engine.reset_prefix_cache(),
            "state": [engine.is_running, engine.errored],
            "tokens": tokens,
        }

    first = asyncio.run(main())
    second = asyncio.run(main())  # and again, in a fresh loop
    assert first == second
    engine.shutdown()
    return first


def two_threads(model: str) -> dict:
    """Two threads, each with its own loop, generating at the same time."""
    engine = make_engine(model)
    reference = asyncio.run(batch(engine, "ref"))
    barrier = threading.Barrier(2)
    results: dict[str, list] = {}
    spans: dict[str, tuple[float, float]] = {}
    errors: list[BaseException] = []

    async def streaming(tag: str) -> list[list[int]]:
        barrier.wait()
        start = time.monotonic()
        out = await batch(engine, tag)
        spans[tag] = (start, time.monotonic())
        return out

    def run(tag: str) -> None:
        try:
            results[tag] = asyncio.run(streaming(tag))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert results["a"] == reference and results["b"] == reference
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    overlap = min(a1, b1) - max(a0, b0)
    engine.shutdown()
    return {"overlap_s": overlap}


def uvloop_and_default(model: str) -> dict:
    """uvloop and the default loop, one after another and at the same time."""
    import uvloop

    engine = make_engine(model)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        first = runner.run(batch(engine, "uv1"))
        loop_type = type(runner.get_loop()).__module__
    second = asyncio.run(batch(engine, "default"))
    box: dict[str, list] = {}
    thread = threading.Thread(target=lambda: box.setdefault("uv", uvloop.run(batch(engine, "uv2"))))
    thread.start()
    third = asyncio.run(batch(engine, "default2"))
    thread.join()
    assert first == second == third == box["uv"]
    engine.shutdown()
    return {"uvloop_module": loop_type}


def llm_threads(model: str) -> dict:
    """`LLM` from plain code, from a thread while another thread runs a loop, and inside a
    running loop (a notebook's case: it blocks that loop, warning once)."""
    from zllm import LLM

    # Built in a thread that is gone before the engine is used: the engine must outlive it
    # (the kernel's parent-death signal fires when the spawning *thread* exits).
    box: dict = {}
    builder = threading.Thread(
        target=lambda: box.setdefault(
            "llm", LLM(model, distributed_executor_backend="uni", kv_cache_memory_bytes=2**24)
        )
    )
    builder.start()
    builder.join()
    llm = box["llm"]
    reference = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]

    ticks = 0
    loop_result: dict = {}
    running, stop = threading.Event(), threading.Event()

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    async def loop_main() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            in_loop = llm.generate(PROMPTS, GREEDY)
            llm.generate(PROMPTS[:1], GREEDY)  # warned once only
        loop_result["in_loop"] = [o.outputs[0].token_ids for o in in_loop]
        loop_result["warnings"] = [str(w.message) for w in caught]
        ticker = asyncio.create_task(tick())
        running.set()
        # the supported way from a loop: another thread does the blocking
        outs = await asyncio.to_thread(llm.generate, PROMPTS, GREEDY)
        loop_result["to_thread"] = [o.outputs[0].token_ids for o in outs]
        await asyncio.to_thread(stop.wait)
        ticker.cancel()

    loop_thread = threading.Thread(target=asyncio.run, args=(loop_main(),))
    loop_thread.start()
    running.wait()
    ticks_before = ticks
    from_thread: dict = {}
    worker = threading.Thread(
        target=lambda: from_thread.setdefault("outs", llm.generate(PROMPTS, GREEDY))
    )
    worker.start()
    plain = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    worker.join()
    ticks_during = ticks - ticks_before
    stop.set()
    loop_thread.join()
    llm.shutdown()
    assert plain == reference
    assert [o.outputs[0].token_ids for o in from_thread["outs"]] == reference
    assert loop_result["to_thread"] == reference
    assert loop_result["in_loop"] == reference
    return {"warnings": loop_result["warnings"], "ticks": ticks_during}


SCENARIOS = {
    f.__name__: f for f in (five_runs, outside_loop, two_threads, uvloop_and_default, llm_threads)
}

if __name__ == "__main__":
    name, model_path = sys.argv[1], sys.argv[2]
    result = SCENARIOS[name](model_path)
    print(json.dumps({"ok": name, **result}), flush=True)
