"""`zllm bench latency`: for each batch size b, b random prompts sent together through
`AsyncLLM` (streamed): time to first token, then decode speed per stream and in all.

TTFT is measured from sending to each stream's first token (mean over the batch), on prompts
no earlier request cached (`cached_prompt_tokens` says how many were found cached); decode
tok/s per stream is (tokens - 1) / (last token - first token), averaged; total decode tok/s
is b times that. The transformers peer (`generate`, batch b) reports the same: its TTFT is a
`max_new_tokens=1` call, its decode time the full call minus that.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import torch

from zllm.bench.model_source import ModelSource, default_device, default_dtype, synchronize
from zllm.bench.workload import random_workload


async def _stream(engine, prompt: list[int], output_len: int, request_id: str):
    from zllm import RequestOutputKind, SamplingParams

    params = SamplingParams(
        max_tokens=output_len,
        temperature=0.0,
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )
    start = time.perf_counter()
    first = None
    tokens = cached = 0
    async for out in engine.generate({"prompt_token_ids": prompt}, params, request_id):
        if out.outputs[0].token_ids and first is None:
            first = time.perf_counter()
        tokens += len(out.outputs[0].token_ids)
        cached = out.num_cached_tokens or 0
    return first - start, time.perf_counter() - first, tokens, cached


def _row(
    engine: str,
    batch: int,
    ttft: list[float],
    decode: list[tuple[float, int]],
    cached: int | None = None,
) -> dict:
    per_stream = statistics.mean((n - 1) / s for s, n in decode)
    row = {
        "engine": engine,
        "batch": batch,
        "ttft_ms": round(1000 * statistics.mean(ttft), 2),
        "decode_tok_s_per_stream": round(per_stream, 1),
        "decode_tok_s": round(batch * per_stream, 1),
        "ms_per_token": round(1000 / per_stream, 2),
    }
    if cached is not None:  # prompt tokens found in the prefix cache: 0 for a true prefill
        row["cached_prompt_tokens"] = cached
    return row


def run_zllm(
    source: ModelSource, batches: list[int], input_len: int, output_len: int, engine_kwargs: dict
) -> list[dict]:
    from zllm import AsyncLLM, EngineArgs
    from zllm.frontend.cli import run_async

    vocab = source.vocab_size()
    engine = AsyncLLM(
        EngineArgs(
            model=source.path,
            skip_tokenizer_init=True,
            load_format=source.load_format,
            seed=source.seed,
            **engine_kwargs,
        )
    )
    rows = []

    def prompts_for(b: int, seed: int) -> list[list[int]]:
        return random_workload(b, (input_len, input_len), (1, 1), vocab, seed=seed).prompts

    # A batch of 1 warms up first, on a prompt of its own: one the warm-up had cached would
    # time a prefix-cache hit instead of a prefill.
    plan = [(1, prompts_for(1, seed=0)), *((b, prompts_for(b, seed=b)) for b in batches)]
    try:
        for b, prompts in plan:

            async def batch(prompts=prompts, b=b):
                return await asyncio.gather(
                    *(_stream(engine, p, output_len, f"lat-{b}-{i}") for i, p in enumerate(prompts))
                )

            results = run_async(batch())
            ttft, decode = [r[0] for r in results], [(r[1], r[2]) for r in results]
            rows.append(_row("zllm", b, ttft, decode, sum(r[3] for r in results)))
    finally:
        engine.shutdown()
    return rows[1:]


@torch.no_grad()
def run_peer(
    source: ModelSource, batches: list[int], input_len: int, output_len: int
) -> list[dict]:
    device = default_device()
    model = source.peer_model(device, default_dtype(device))
    vocab = source.vocab_size()
    rows = []
    for b in [1, *batches]:
        prompts = random_workload(b, (input_len, input_len), (1, 1), vocab, seed=b).prompts
        ids = torch.tensor(prompts, device=device)
        timings = []
        for new in (1, output_len):
            synchronize(device)
            start = time.perf_counter()
            model.generate(
                ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )
            synchronize(device)
            timings.append(time.perf_counter() - start)
        ttft, total = timings
        rows.append(_row("transformers generate", b, [ttft], [(total - ttft, output_len)]))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows[1:]
