"""`LLM.get_metrics()` and `do_log_stats()`: the engine's counters under vLLM's metric names.

The classes mirror `vllm.v1.metrics.reader` (`Counter`, `Gauge`, `Vector`, `Histogram`), so a
script that walks `llm.get_metrics()` with `isinstance` runs as is. Values come from the
engine's `SchedulerStats`; names without a vLLM equivalent start with `zllm:`.
"""

from __future__ import annotations

from dataclasses import dataclass

from zllm.protocol.messages import SchedulerStats


@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Vector(Metric):
    values: list[int]


@dataclass
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int]


def kv_cache_usage(stats: SchedulerStats) -> float:
    return stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0


def metrics_from_stats(stats: SchedulerStats, model_name: str) -> list[Metric]:
    labels = {"model_name": model_name, "engine": "0"}
    return [
        Gauge("vllm:num_requests_running", dict(labels), stats.num_running),
        Gauge("vllm:num_requests_waiting", dict(labels), stats.num_waiting),
        Gauge("vllm:kv_cache_usage_perc", dict(labels), kv_cache_usage(stats)),
        Counter("vllm:prefix_cache_queries", dict(labels), stats.prefix_cache_queries),
        Counter("vllm:prefix_cache_hits", dict(labels), stats.prefix_cache_hits),
        Counter("vllm:num_preemptions", dict(labels), stats.num_preemptions),
        Counter("zllm:prefill_tokens_computed", dict(labels), stats.num_prefill_tokens),
        Counter("zllm:engine_steps", dict(labels), stats.num_steps),
    ]


def stats_line(stats: SchedulerStats) -> str:
    """One log line, as vLLM's `do_log_stats` prints it."""
    hit_rate = (
        stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0
    )
    return (
        f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
        f"KV cache usage: {kv_cache_usage(stats):.1%}, Prefix cache hit rate: {hit_rate:.1%}, "
        f"Preemptions: {stats.num_preemptions}, Steps: {stats.num_steps}"
    )
