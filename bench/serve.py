"""`zllm bench serve`: load a running server (`zllm serve`, or any OpenAI-compatible one) and
measure what its clients see: time to first token, time per output token, inter-token
latency (p50/p90/p99), request and token throughput.

Requests go to `/v1/completions`, streamed, with `continuous_usage_stats` so every chunk
says how many tokens it carries; EOS is ignored so each request makes exactly its output
length. `--no-stream` asks for whole completions instead: throughput and end-to-end latency
only, without a chunk per token (whose parsing, in the client and the server, would bound
the figure for a small model on fast GPUs). Arrivals are a Poisson process at `--request-rate` (inf: all at once), optionally
capped at `--max-concurrency` requests in flight. Prompts are random token ids of random
lengths, or ShareGPT conversations (`--dataset sharegpt --dataset-path FILE`: the first
turn is the prompt, the token count of the reply is the output length).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from zllm.bench.workload import random_workload

PERCENTILES = (50, 90, 99)


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


class Server:
    """The few calls the benchmark makes besides the load itself."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str | None):
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def model(self) -> tuple[str, int]:
        """The first served model and its max_model_len."""
        async with self.session.get(self.base_url + "/v1/models", headers=self.headers) as r:
            r.raise_for_status()
            card = (await r.json())["data"][0]
            return card["id"], card.get("max_model_len") or 2**31

    async def count_tokens(self, model: str, text: str) -> int:
        body = {"model": model, "prompt": text, "add_special_tokens": False}
        async with self.session.post(self.base_url + "/tokenize", json=body) as r:
            r.raise_for_status()
            return (await r.json())["count"]


def random_requests(
    n: int, input_len, output_len, vocab_size: int, seed: int
) -> list[BenchRequest]:
    workload = random_workload(n, input_len, output_len, vocab_size, seed)
    return [
        BenchRequest(prompt, len(prompt), out)
        for prompt, out in zip(workload.prompts, workload.output_lens)
    ]


async def sharegpt_requests(
    server: Server, model: str, path: str, n: int, max_model_len: int, seed: int
) -> list[BenchRequest]:
    """ShareGPT's shape: first human turn as the prompt, the reply's length as the output
    (conversations too short or too long for the model are skipped, as vLLM's bench does)."""
    with open(path) as f:
        conversations = [
            c["conversations"] for c in json.load(f) if len(c.get("conversations", [])) >= 2
        ]
    random.Random(seed).shuffle(conversations)
    requests = []
    for turns in conversations:
        if len(requests) == n:
            break
        prompt, reply = turns[0]["value"], turns[1]["value"]
        prompt_len = await server.count_tokens(model, prompt)
        output_len = await server.count_tokens(model, reply)
        if prompt_len < 4 or output_len < 4 or prompt_len + output_len > max_model_len:
            continue
        requests.append(BenchRequest(prompt, prompt_len, output_len))
    if len(requests) < n:
        raise ValueError(
            f"--dataset-path {path}: only {len(requests)} usable conversations, {n} asked"
        )
    return requests


async def send(
    server: Server, model: str, request: BenchRequest, stream: bool = True
) -> RequestResult:
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    result = RequestResult()
    start = time.perf_counter()
    url = server.base_url + "/v1/completions"
    try:
        async with server.session.post(url, json=body, headers=server.headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            if stream:
                await _read_chunks(response, result, start)
                if result.error:
                    return result
            else:
                usage = (await response.json())["usage"]
                result.output_tokens = usage["completion_tokens"]
                result.prompt_tokens = usage["prompt_tokens"]
    except aiohttp.ClientError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = result.output_tokens > 0
    return result


async def _read_chunks(
    response: aiohttp.ClientResponse, result: RequestResult, start: float
) -> None:
    """Time each chunk that brings tokens: the first one's arrival is the TTFT, the gaps
    between the later ones the inter-token latencies."""
    last = start
    async for line in response.content:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            result.error = chunk["error"].get("message", "error event")
            return
        usage = chunk.get("usage") or {}
        tokens = usage.get("completion_tokens", result.output_tokens)
        now = time.perf_counter()
        if chunk.get("choices") and tokens > result.output_tokens:
            if result.output_tokens == 0:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
        result.output_tokens = tokens
        result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)


async def run_load(
    server: Server,
    model: str,
    requests: list[BenchRequest],
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
    stream: bool = True,
) -> tuple[list[RequestResult], float]:
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    rng = random.Random(seed)

    async def one(request: BenchRequest) -> RequestResult:
        if limit is None:
            return await send(server, model, request, stream)
        async with limit:
            return await send(server, model, request, stream)

    start = time.perf_counter()
    tasks = []
    for i, request in enumerate(requests):
        tasks.append(asyncio.ensure_future(one(request)))
        if math.isfinite(request_rate) and i < len(requests) - 1:
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def _stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    ms = np.asarray(values) * 1000.0
    return {"mean": round(float(ms.mean()), 3), **{f"p{p}": round(float(np.percentile(ms, p)), 3) for p in PERCENTILES}}  # fmt: skip


def summarize(
    results: list[RequestResult], duration: float, streamed: bool = True
) -> dict[str, Any]:
    """Throughput and latencies of the requests that completed; time to first token and
    between tokens only when the tokens were streamed (None otherwise)."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": round(duration, 3),
        "request_throughput": round(len(done) / duration, 3),
        "output_token_throughput": round(output_tokens / duration, 3),
        "total_token_throughput": round((prompt_tokens + output_tokens) / duration, 3),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "ttft_ms": _stats_ms([r.ttft for r in done]) if streamed else None,
        "tpot_ms": _stats_ms(tpot) if streamed else None,
        "itl_ms": _stats_ms([t for r in done for t in r.itl]) if streamed else None,
        "e2e_ms": _stats_ms([r.latency for r in done]),
    }


async def bench(ns) -> dict[str, Any]:
    from zllm.bench.workload import parse_length

    timeout = aiohttp.ClientTimeout(total=None, sock_read=ns.timeout)
    connector = aiohttp.TCPConnector(limit=0)  # concurrency is the benchmark's to decide
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        server = Server(session, ns.base_url, ns.api_key)
        model, max_model_len = await server.model()
        model = ns.model or model
        if ns.dataset == "sharegpt":
            if not ns.dataset_path:
                raise ValueError("--dataset sharegpt needs --dataset-path FILE (ShareGPT JSON)")
            requests = await sharegpt_requests(
                server, model, ns.dataset_path, ns.num_prompts, max_model_len, ns.seed
            )
        else:
            requests = random_requests(
                ns.num_prompts,
                parse_length(ns.input_len),
                parse_length(ns.output_len),
                ns.vocab_size,
                ns.seed,
            )
        results, duration = await run_load(
            server, model, requests, ns.request_rate, ns.max_concurrency, ns.seed, ns.stream
        )
    return {
        "model": model,
        "base_url": ns.base_url,
        "workload": {
            "dataset": ns.dataset,
            "requests": len(requests),
            "request_rate": ns.request_rate if math.isfinite(ns.request_rate) else "inf",
            "max_concurrency": ns.max_concurrency,
            "stream": ns.stream,
            "input_len": [min(r.prompt_len for r in requests), max(r.prompt_len for r in requests)],
            "output_len": [
                min(r.output_len for r in requests),
                max(r.output_len for r in requests),
            ],
        },
        "results": [summarize(results, duration, ns.stream)],
    }
