"""Greedy parity with transformers: the engine must produce the same tokens as `model.generate`.

For the default model and tiny random Llama / Qwen2 / Qwen3 checkpoints, 8 varied prompts run
all at once through an `LLM.generate` batch and, at the same time, through 8 concurrent
`AsyncLLM` streams; the first 32 token ids of each must equal transformers' greedy output on
the same checkpoint. Both frontends share one `zllm engine-core` daemon per model, so the test
also covers the daemon command and a core serving two clients at once.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from zllm import LLM, AsyncLLM, EngineArgs, RequestOutputKind, SamplingParams

MAX_NEW = 32
UTF8_PROMPT = "日本の首都は東京です。🍣🗼 次に有名な都市は"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    UTF8_PROMPT,
    "Hi",
    "1, 2, 3, 4, 5,",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who "
    "every morning walked down to the harbour, untied his little blue boat and rowed out "
    "past the lighthouse, where the water turned from green to a deep and endless grey.",
    "Translate to German: 'Good morning, how are you today?'",
]
MODELS = ["default", "llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def model_paths(default_model_path: str, tiny_checkpoints: dict[str, str]) -> dict[str, str]:
    return {"default": default_model_path, **tiny_checkpoints}


@functools.cache
def hf_reference(path: str) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, greedy generated ids truncated after the first EOS) per prompt, once per model.

    One left-padded `generate` call for all prompts: a 135M model reads all its weights once
    per step, so 8 sequential calls cost 8x (its tokens were checked equal to 8 single calls).
    One thread, so it overlaps with the daemon loading its model on the other core.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = min(eos_ids)
    prompt_ids = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    width = max(map(len, prompt_ids))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=pad
            )
    finally:
        torch.set_num_threads(threads)
    generated = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        generated.append(row[:cut])
    return prompt_ids, generated


def check_against_reference(path: str, results: list[tuple[list[int], list[int], str]]) -> None:
    """`results[i]` = (prompt ids, generated ids, text) for PROMPTS[i]."""
    from transformers import AutoTokenizer

    prompt_ids, expected = hf_reference(path)
    for i, (ids, tokens, _) in enumerate(results):
        assert ids == prompt_ids[i], f"prompt {i} tokenized differently"
        assert tokens[:MAX_NEW] == expected[i], (
            f"prompt {i} {PROMPTS[i]!r}: engine {tokens} != transformers {expected[i]}"
        )
    # Incremental detokenization ends where decoding everything at once does, except that a
    # character still incomplete when generation stops is held back, never emitted broken.
    tokenizer = AutoTokenizer.from_pretrained(path)
    for i, (_, tokens, text) in enumerate(results):
        full = tokenizer.decode(tokens, skip_special_tokens=True)
        assert text == full.rstrip("\ufffd"), f"prompt {i} {PROMPTS[i]!r}"


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def assert_batched(num_steps: int, results: list[tuple[list[int], list[int], str]]) -> None:
    """One request per step would take a step per token; concurrent requests share steps."""
    total = sum(len(tokens) for _, tokens, _ in results)
    assert num_steps < total / 4, f"{num_steps} steps for {total} tokens: requests were not batched"


@pytest.fixture(params=MODELS)
def daemon(request, model_paths: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(model path, address) of a `zllm engine-core` daemon serving that model."""
    path = model_paths[request.param]
    directory = tempfile.mkdtemp(prefix="zllm-parity-")
    address = f"ipc://{directory}/core"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zllm.frontend.cli", "engine-core", "--address", address]
        + ["--model", path, "--distributed-executor-backend", "uni", "--max-model-len", "512"],
        env={**os.environ, "ZLLM_LOG_LEVEL": "WARNING"},
    )
    try:
        yield path, address
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    leftovers = os.listdir(directory) if os.path.isdir(directory) else []
    shutil.rmtree(directory, ignore_errors=True)
    assert code == 0, f"engine-core exited with {code} on SIGTERM"
    assert leftovers == [], f"engine-core left {leftovers} behind"


async def _stream_all(engine: AsyncLLM) -> list[tuple[list[int], list[int], str]]:
    """8 concurrent DELTA streams, reassembled into (prompt ids, token ids, text)."""
    params = greedy().clone(output_kind=RequestOutputKind.DELTA)

    async def one(i: int, prompt: str) -> tuple[list[int], list[int], str]:
        tokens: list[int] = []
        text = ""
        prompt_ids: list[int] = []
        finished = False
        async for out in engine.generate(prompt, params, f"parity-{i}"):
            assert not finished, "output after the final one"
            prompt_ids = out.prompt_token_ids
            tokens += out.outputs[0].token_ids
            text += out.outputs[0].text
            finished = out.finished
        assert finished
        return prompt_ids, tokens, text

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))


@pytest.mark.timeout(240)
def test_greedy_matches_transformers(daemon: tuple[str, str]) -> None:
    path, address = daemon
    hf_reference(path)  # computed while the daemon loads its model
    llm = LLM(engine_core_address=address)
    engine = AsyncLLM(EngineArgs(engine_core_address=address))

    async def run_both() -> tuple[list, list, int]:
        steps_before = (await engine.get_stats()).num_steps
        batch, streams = await asyncio.gather(
            asyncio.to_thread(llm.generate, PROMPTS, greedy()), _stream_all(engine)
        )
        return batch, streams, (await engine.get_stats()).num_steps - steps_before

    try:
        batch, streams, steps = asyncio.run(run_both())
    finally:
        llm.shutdown()
        engine.shutdown()
    assert [o.prompt for o in batch] == PROMPTS, "LLM.generate must keep the input order"
    llm_results = [(o.prompt_token_ids, o.outputs[0].token_ids, o.outputs[0].text) for o in batch]
    check_against_reference(path, llm_results)
    check_against_reference(path, streams)
    assert_batched(steps, llm_results + streams)
