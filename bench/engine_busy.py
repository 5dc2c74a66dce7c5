"""`zllm bench busy`: how busy the device stays while N requests decode through the whole
engine (frontend, engine-core and worker processes), the host path's own figure.

`zllm bench profile` times one step of a worker alone, start to end, so its host work can
never overlap the device. Here the steps run as they do in service: engine-core schedules
step N+1 while the worker runs step N, and the worker launches N+1 before N finishes. Once
every request decodes, the torch profiler runs in the worker for `window` steps; the busy
share is the union of the device's activity (kernels, copies, fills) over the middle 80% of
that window (its ends are perturbed by the profiler's own start and stop), and the step time
is that span over the decode steps it holds (CUDA-graph launches). Without a GPU there is no
device activity to measure: it says so and reports the step time alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time

from zllm.bench.model_source import ModelSource
from zllm.bench.step_profile import idle_gaps_us

_DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
# An idle gap this long is the device waiting for the host (a step launched late); shorter
# ones are the device's own, between the kernels of a step (~1 us each in a CUDA graph).
LONG_GAP_US = 20.0


def device_activity(trace_path: str) -> dict:
    """From a Chrome trace of the torch profiler: busy share and decode steps over the middle
    80% of the span the device was active."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    device = [
        (e["ts"], e["ts"] + e.get("dur", 0))
        for e in events
        if e.get("cat") in _DEVICE_CATEGORIES and e.get("ph") == "X"
    ]
    graph_launches = [
        e["ts"] for e in events if e.get("ph") == "X" and e.get("name") == "cudaGraphLaunch"
    ]
    if not device:
        return {}
    first, last = min(a for a, _ in device), max(b for _, b in device)
    lo, hi = first + 0.1 * (last - first), last - 0.1 * (last - first)
    clipped = [(max(a, lo), min(b, hi)) for a, b in device if b > lo and a < hi]
    steps = sum(1 for t in graph_launches if lo <= t < hi)
    span_us = hi - lo
    gaps = idle_gaps_us(clipped, lo, hi)  # the window less the union of the device's activity
    long_gaps = [g for g in gaps if g >= LONG_GAP_US]
    return {
        "window_ms": round(span_us / 1000, 2),
        "busy_share": round(1 - sum(gaps) / span_us, 3),
        "decode_steps": steps,
        "ms_per_step": round(span_us / 1000 / steps, 3) if steps else None,
        # Where the idle time is: waiting for the host, or between a step's kernels.
        "idle_share_long_gaps": round(sum(long_gaps) / span_us, 3),
        "idle_share_short_gaps": round((sum(gaps) - sum(long_gaps)) / span_us, 3),
        "long_gaps": len(long_gaps),
    }


async def _run(
    source: ModelSource,
    num_requests: int,
    prompt_len: int,
    warmup: int,
    window: int,
    engine_kwargs: dict,
) -> dict:
    from zllm import AsyncLLM, SamplingParams
    from zllm.sampling_params import RequestOutputKind

    llm = AsyncLLM(
        model=source.path,
        skip_tokenizer_init=True,
        load_format=source.load_format,
        seed=source.seed,
        **engine_kwargs,
    )
    try:
        output_len = warmup + window + 64  # the window ends while every request decodes
        # Final outputs only: the frontend stays idle, the engine's pace is what is measured.
        params = SamplingParams(
            max_tokens=output_len,
            temperature=0.0,
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

        async def consume(i: int) -> None:
            prompt = [10 + (7 * i + j) % 20000 for j in range(prompt_len)]
            async for _ in llm.generate({"prompt_token_ids": prompt}, params, f"busy-{i}"):
                pass

        # Progress is read from the engine's own counters: the frontend may lag behind it.
        baseline = await llm.get_stats()

        async def until(ready, what: str, every_s: float = 0.001):
            while True:
                stats = await llm.get_stats()
                if ready(stats):
                    return stats
                if not any(not t.done() for t in tasks):
                    raise RuntimeError(f"the requests ended before {what}: raise the output")
                await asyncio.sleep(every_s)

        tasks = [asyncio.create_task(consume(i)) for i in range(num_requests)]
        start = time.perf_counter()
        prompts = baseline.num_prefill_tokens + num_requests * prompt_len
        decoding = await until(lambda s: s.num_prefill_tokens >= prompts, "decoding")
        await until(lambda s: s.num_steps >= decoding.num_steps + warmup, "the window")
        decoding_at = time.perf_counter()
        await llm.collective_rpc("start_profile")
        profiled_at = time.perf_counter()
        began = await llm.get_stats()
        # Polled less often now: each call is a message engine-core handles between steps.
        ended = await until(
            lambda s: s.num_steps >= began.num_steps + window, "the window ended", every_s=0.01
        )
        ended_at = time.perf_counter()
        paths = await llm.collective_rpc("stop_profile")
        await asyncio.gather(*tasks)
    finally:
        llm.shutdown()
    result = {
        "requests": num_requests,
        "prompt_len": prompt_len,
        "window_steps": window,
        "wall_ms_per_step": round(
            1000 * (ended_at - profiled_at) / (ended.num_steps - began.num_steps), 3
        ),
        "warmup_s": round(decoding_at - start, 2),
    }
    activity = device_activity(paths[0])
    if activity:
        result.update(activity)
        result["measured"] = "device activity in the worker's trace"
    else:
        result["measured"] = "no device activity (CPU): the step time alone"
    return result


def run(
    source: ModelSource,
    num_requests: int,
    prompt_len: int,
    warmup: int,
    window: int,
    engine_kwargs: dict,
) -> dict:
    from zllm.worker.profiler import PROFILER_DIR_ENV

    # The workers read it at start-up; a directory of our own unless the caller chose one.
    os.environ.setdefault(PROFILER_DIR_ENV, tempfile.mkdtemp(prefix="zllm-busy-"))
    engine_kwargs = {"max_num_seqs": num_requests, **engine_kwargs}
    return asyncio.run(_run(source, num_requests, prompt_len, warmup, window, engine_kwargs))
