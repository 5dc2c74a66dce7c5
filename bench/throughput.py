"""`zllm bench throughput`: N random-token prompts through `LLM.generate` at once (EOS
ignored, greedy), and optionally the same workload on transformers in the same run.

Throughput counts the requested tokens: output tok/s = output tokens / seconds, total tok/s
= (prompt + output tokens) / seconds, from the first request sent to the last one done.
"""

from __future__ import annotations

import time

from zllm.bench.model_source import ModelSource, default_device, default_dtype
from zllm.bench.workload import Workload


def run_zllm(source: ModelSource, workload: Workload, engine_kwargs: dict) -> dict:
    from zllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        source.path,
        skip_tokenizer_init=True,
        load_format=source.load_format,
        seed=source.seed,
        **engine_kwargs,
    )
    load_s = time.perf_counter() - start
    try:
        warm = SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False)
        llm.generate([{"prompt_token_ids": workload.prompts[0]}], warm)
        params = [
            SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
            for n in workload.output_lens
        ]
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in workload.prompts], params)
        seconds = time.perf_counter() - start
    finally:
        llm.shutdown()
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    if generated != workload.output_tokens:
        raise RuntimeError(f"zllm generated {generated} tokens, {workload.output_tokens} asked")
    return {
        "engine": "zllm",
        "seconds": seconds,
        "load_s": round(load_s, 2),
        "first_tokens": outputs[0].outputs[0].token_ids[:8],
    }


def run_peers(source: ModelSource, workload: Workload, peer_batch: int) -> list[dict]:
    import torch

    from zllm.bench import peer

    device = default_device()
    model = source.peer_model(device, default_dtype(device))
    results = [
        peer.generate_static(model, workload, peer_batch or len(workload.prompts), device),
        peer.generate_batch(model, workload, device),
    ]
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # before the engine sizes its KV cache
    return results


def run(
    source: ModelSource, workload: Workload, engine_kwargs: dict, peers: list[str], peer_batch: int
) -> list[dict]:
    """Peers first (on a GPU the engine then takes the memory they leave), then zllm."""
    results = run_peers(source, workload, peer_batch) if "transformers" in peers else []
    results.insert(0, run_zllm(source, workload, engine_kwargs))
    for r in results:
        r["output_tok_s"] = round(workload.output_tokens / r["seconds"], 1)
        r["total_tok_s"] = round(
            (workload.prompt_tokens + workload.output_tokens) / r["seconds"], 1
        )
        r["requests_s"] = round(len(workload.prompts) / r["seconds"], 2)
        r["seconds"] = round(r["seconds"], 3)
    return results
