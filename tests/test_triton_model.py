"""A whole tiny model through the Triton path (attention and fused layers, in Triton's
interpreter on the CPU) gives the same greedy tokens as the torch path, over prefix-cache
hits, chunked prefill and steps that mix decodes with prompt chunks."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import build_tiny_checkpoint

from zllm import LLM, SamplingParams
from zllm.frontend.errors import EngineStartupError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)

PREFIX = list(range(100, 140))  # 40 tokens: two full blocks that later prompts find cached
FIRST = [PREFIX + [7, 8, 9]]
THEN = [PREFIX + [11, 12], PREFIX[:20] + [5] * 50, [300 + i for i in range(70)], [42]]
KINDS = ["llama", "qwen3"]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, detokenize=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Without a tokenizer, so this runs on a GPU machine that has no default model."""
    root = tmp_path_factory.mktemp("tiny-ids")
    return {kind: str(build_tiny_checkpoint(kind, root / kind, None)) for kind in KINDS}


def generate(path: str) -> tuple[list[list[int]], list[int]]:
    """Tokens of each prompt, and how many prompt tokens each second-round prompt found cached."""
    llm = LLM(
        path,
        skip_tokenizer_init=True,
        dtype="float32",
        distributed_executor_backend="uni",
        max_num_batched_tokens=48,  # the 70-token prompts run in chunks, beside decodes
        max_num_seqs=8,
        max_model_len=256,
    )
    try:
        first = llm.generate([{"prompt_token_ids": p} for p in FIRST], PARAMS)
        then = llm.generate([{"prompt_token_ids": p} for p in THEN], PARAMS)
    finally:
        llm.shutdown()
    outputs = first + then
    return [o.outputs[0].token_ids for o in outputs], [o.num_cached_tokens for o in then]


@pytest.mark.parametrize("kind", KINDS)
def test_triton_path_matches_torch_path(kind, checkpoints, monkeypatch):
    monkeypatch.setenv("ZLLM_ATTENTION_BACKEND", "torch")
    expected, cached = generate(checkpoints[kind])
    assert cached[0] >= 32  # the shared prefix was a cache hit
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ZLLM_ATTENTION_BACKEND", "triton")
    got, cached_triton = generate(checkpoints[kind])
    assert cached_triton == cached
    assert got == expected


def test_backend_choice_reaches_the_worker(checkpoints, monkeypatch):
    """The variable is honoured, not ignored: an impossible choice fails the start, by name."""
    monkeypatch.setenv("ZLLM_ATTENTION_BACKEND", "cudnn")
    with pytest.raises(EngineStartupError, match="ZLLM_ATTENTION_BACKEND"):
        LLM(checkpoints["llama"], skip_tokenizer_init=True, distributed_executor_backend="uni")
