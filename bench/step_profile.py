"""`zllm bench profile`: one steady decode step inside a worker (no processes, no IPC).

A worker is built in this process, `batch` sequences are prefilled, then decode steps run:
first timed alone (the median is the wall time; a step ends with its sampled ids on the
host, so it includes the device), then under `torch.profiler` for the kernel time (the union of GPU kernel intervals), kernels
launched, and the GPU-busy share (kernel time / wall time). Without a GPU there are no
kernels: it reports the CPU time spent inside top-level torch ops, their count, and their
share of the profiled steps' wall time (op times include the profiler's overhead), and
says so (`"measured"`).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from zllm.bench.model_source import ModelSource


def idle_gaps_us(intervals: list[tuple[float, float]], lo: float, hi: float) -> list[float]:
    """The stretches of [lo, hi] that no interval covers."""
    gaps, end = [], lo
    for a, b in sorted(intervals):
        if a > end:
            gaps.append(a - end)
        end = max(end, b)
    if hi > end:
        gaps.append(hi - end)
    return gaps


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """The time at least one interval covers."""
    if not intervals:
        return 0.0
    lo, hi = min(a for a, _ in intervals), max(b for _, b in intervals)
    return hi - lo - sum(idle_gaps_us(intervals, lo, hi))


def _top(kernels: list, steps: int, n: int) -> list[dict]:
    """The `n` kernels that take the most time per step: name, launches and microseconds."""
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:n]
    return [
        {
            "name": name[:120],
            "per_step": round(len(times) / steps, 1),
            "us_per_step": round(sum(times) / steps, 1),
        }
        for name, times in ranked
    ]


def run(
    source: ModelSource,
    batch: int,
    context_len: int,
    steps: int,
    engine_kwargs: dict,
    top_kernels: int = 0,
) -> dict:
    from zllm.protocol.config import EngineArgs, ModelConfig
    from zllm.protocol.sampling_params import SamplingParams
    from zllm.protocol.worker_messages import ExecuteModel, NewBlocks, NewRequest, SlotStart
    from zllm.worker.worker import Worker

    args = EngineArgs(
        model=source.path, load_format=source.load_format, seed=source.seed, **engine_kwargs
    )
    config = ModelConfig.from_path(source.path, max_model_len=args.max_model_len)
    worker = Worker(args, config)
    bs = args.block_size
    warmup = 3
    per_seq = -(-(context_len + warmup + 2 * steps + 1) // bs)
    worker.init_kv_cache(batch * per_seq)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    prompts = [[10 + (i + j) % 1000 for j in range(context_len)] for i in range(batch)]
    slots = list(range(batch))
    # Prefill as the engine would: as many sequences a step as max_num_batched_tokens allows.
    group = max(1, args.resolved_max_num_batched_tokens(config.max_model_len) // context_len)
    for first in range(0, batch, group):
        some = slots[first : first + group]
        worker.execute_model(
            ExecuteModel(
                new_requests=[
                    NewRequest(slot=i, prompt_token_ids=prompts[i], sampling_params=params)
                    for i in some
                ],
                started=[SlotStart(i, 0) for i in some],
                new_block_ids=[NewBlocks(i, tables[i]) for i in some],
                slots=some,
                num_scheduled_tokens=[context_len] * len(some),
            )
        )
    decode = ExecuteModel(slots=slots, num_scheduled_tokens=[1] * batch)  # the worker's own tokens

    def step() -> float:
        start = time.perf_counter()
        worker.execute_model(decode)
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    # Wall time without the profiler (its per-op bookkeeping costs host time), then the same
    # number of steps under it for the kernels.
    wall_us = 1e6 * statistics.median(step() for _ in range(steps))
    cuda = worker.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        profiled_wall_us = 1e6 * statistics.mean(step() for _ in range(steps))
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / steps
        what = "GPU kernels"
        wall_for_share = wall_us  # kernel durations do not change under the profiler
    else:
        kernels = [e for e in events if e.cpu_parent is None and "::" in e.name]
        busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / steps
        what = "CPU time inside top-level torch ops (no GPU: no kernel time)"
        # Op times carry the profiler's own overhead: compare them with profiled steps.
        wall_for_share = profiled_wall_us
    result = {
        "shape": source.name,
        "device": str(worker.device),
        "dtype": str(worker.dtype).removeprefix("torch."),
        "attention_backend": worker.kernels,
        "batch": batch,
        "context_len": context_len,
        "steps": steps,
        "wall_ms": round(wall_us / 1000, 3),
        "kernel_ms": round(busy_us / 1000, 3),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "profiled_wall_ms": round(profiled_wall_us / 1000, 3),
        "busy_share": round(busy_us / wall_for_share, 3),
        "measured": what,
    }
    if top_kernels:
        result["top_kernels"] = _top(kernels, steps, top_kernels)
    return result
