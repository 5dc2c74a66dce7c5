"""The same workload on transformers, in this process: static batches through `generate`
(left-padded, each batch runs to its longest output) and continuous batching through
`generate_batch`. Only the requested output tokens are counted."""

from __future__ import annotations

import time

import torch

from zllm.bench.model_source import synchronize
from zllm.bench.workload import Workload


def _pad_left(prompts: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.no_grad()
def generate_static(model, workload: Workload, batch_size: int, device: str) -> dict:
    """`model.generate` over batches of `batch_size`, EOS ignored (min_new_tokens)."""
    ids, mask = _pad_left(workload.prompts[:batch_size], device)
    model.generate(
        ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0
    )  # warm-up at the batch's shape
    synchronize(device)
    first_tokens: list[int] = []
    start = time.perf_counter()
    for i in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[i : i + batch_size]
        new = max(workload.output_lens[i : i + batch_size])
        ids, mask = _pad_left(prompts, device)
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        if not first_tokens:
            first_tokens = out[0, ids.shape[1] : ids.shape[1] + 8].tolist()
    synchronize(device)
    return {
        "engine": f"transformers generate (batch {batch_size})",
        "seconds": time.perf_counter() - start,
        "first_tokens": first_tokens,
    }


@torch.no_grad()
def generate_batch(model, workload: Workload, device: str) -> dict:
    """`model.generate_batch` (continuous batching), EOS disabled, the longest output each.

    On a GPU with transformers' defaults. On the CPU its default KV cache takes a share of
    all host memory and each step gets 10x slower, so it gets 5% of it (still far more than
    this workload needs). Its own warm-up (graph capture on a GPU) is part of each call."""
    from transformers import GenerationConfig

    cb_config = None
    if device == "cpu":
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        cb_config = ContinuousBatchingConfig(max_memory_percent=0.05)

    def run(prompts: list[list[int]], new_tokens: int) -> dict:
        config = GenerationConfig(
            max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
        )
        return model.generate_batch(
            prompts, generation_config=config, continuous_batching_config=cb_config
        )

    run(workload.prompts[:2], 2)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    results = run(workload.prompts, max(workload.output_lens))
    synchronize(device)
    seconds = time.perf_counter() - start
    outputs = list(results.values())
    failed = [o.error for o in outputs if o.error]
    if failed or len(outputs) != len(workload.prompts):
        raise RuntimeError(f"transformers generate_batch failed: {failed[:1]}")
    return {
        "engine": "transformers generate_batch",
        "seconds": seconds,
        "first_tokens": list(outputs[0].generated_tokens[:8]),
    }
