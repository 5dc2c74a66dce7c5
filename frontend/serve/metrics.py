"""`GET /metrics`: vLLM's metric set under the `zllm:` prefix, with a `model_name` label, in
Prometheus' text format (`prometheus_client`, a registry per server).

Two sources: the engine's `SchedulerStats` (running, waiting, KV cache, prefix cache,
preemptions), read when scraped; and what this server sees of each request (tokens, finish
reasons, time to first token, inter-token latency, end-to-end latency, queue time, 503s).
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from zllm.frontend.metrics_reader import kv_cache_usage
from zllm.protocol.messages import SchedulerStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

disable_created_metrics()  # no `_created` series beside each counter (vLLM turns them off too)

# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)  # fmt: skip


class EngineStatsCollector:
    """The engine's own gauges and counters, from the last `SchedulerStats` read."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats = SchedulerStats()

    def collect(self):
        s, labels = self.stats, [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge("zllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("zllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("zllm:kv_cache_usage_perc", "KV cache usage (1 = full).", kv_cache_usage(s))
        yield gauge("zllm:kv_cache_used_blocks", "KV cache blocks in use.", s.kv_blocks_used)
        yield gauge("zllm:kv_cache_total_blocks", "KV cache blocks in all.", s.kv_blocks_total)
        yield counter("zllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)  # fmt: skip
        yield counter("zllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)  # fmt: skip
        yield counter("zllm:num_preemptions", "Requests preempted (recomputed later).", s.num_preemptions)  # fmt: skip
        yield counter("zllm:prefill_tokens_computed", "Prompt tokens run through the model.", s.num_prefill_tokens)  # fmt: skip
        yield counter("zllm:engine_steps", "Engine steps that ran the model.", s.num_steps)
        yield counter("zllm:rejected_frames", "Client frames engine-core could not read.", s.num_rejected_frames)  # fmt: skip


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.engine = EngineStatsCollector(model_name)
        self.registry.register(self.engine)
        r, label = self.registry, ["model_name"]
        self.prompt_tokens = Counter("zllm:prompt_tokens", "Prompt tokens of finished requests.", label, registry=r)  # fmt: skip
        self.generation_tokens = Counter("zllm:generation_tokens", "Generated tokens.", label, registry=r)  # fmt: skip
        self.request_success = Counter(
            "zllm:request_success",
            "Finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "zllm:request_rejected",
            "Requests refused with 503 because the queue was full (max_queued_requests).",
            label,
            registry=r,
        )
        self.ttft = Histogram("zllm:time_to_first_token_seconds", "Time to first token.", label, buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("zllm:inter_token_latency_seconds", "Time between streamed outputs.", label, buckets=ITL_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("zllm:e2e_request_latency_seconds", "Arrival to finish.", label, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_time = Histogram("zllm:request_queue_time_seconds", "Time waiting before first scheduled.", label, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.request_prompt_tokens = Histogram("zllm:request_prompt_tokens", "Prompt tokens per request.", label, buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.request_generation_tokens = Histogram("zllm:request_generation_tokens", "Generated tokens per request.", label, buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip

    def render(self, stats: SchedulerStats | None) -> bytes:
        if stats is not None:
            self.engine.stats = stats
        return generate_latest(self.registry)

    def timer(self, model_name: str | None = None) -> RequestTimer:
        """A timer for one request to `model_name` (None: the first model)."""
        return RequestTimer(self, model_name or self.model_name)


class RequestTimer:
    """Observes one request as its outputs reach the server."""

    def __init__(self, metrics: ServerMetrics, model_name: str) -> None:
        self.metrics = metrics
        self.labels = {"model_name": model_name}
        self.arrival = self.last = time.monotonic()
        self.first_seen = False
        self.tokens = 0

    def on_tokens(self, n: int) -> None:
        if n == 0:
            return
        now = time.monotonic()
        m = self.metrics
        if not self.first_seen:
            self.first_seen = True
            m.ttft.labels(**self.labels).observe(now - self.arrival)
        else:
            m.itl.labels(**self.labels).observe(now - self.last)
        self.last = now
        self.tokens += n

    def on_finish(
        self, prompt_tokens: int, finish_reasons: list[str], queue_time: float | None
    ) -> None:
        m, labels = self.metrics, self.labels
        m.e2e.labels(**labels).observe(time.monotonic() - self.arrival)
        m.prompt_tokens.labels(**labels).inc(prompt_tokens)
        m.generation_tokens.labels(**labels).inc(self.tokens)
        m.request_prompt_tokens.labels(**labels).observe(prompt_tokens)
        m.request_generation_tokens.labels(**labels).observe(self.tokens)
        if queue_time is not None:
            m.queue_time.labels(**labels).observe(queue_time)
        for reason in finish_reasons:
            m.request_success.labels(finished_reason=reason, **labels).inc()
