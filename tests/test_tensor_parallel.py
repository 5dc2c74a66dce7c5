"""Tensor parallelism on the CPU (gloo): two worker processes split every layer, and the
greedy tokens are the ones a single rank produces."""

from __future__ import annotations

import pytest

from zllm import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10]}, {"prompt_token_ids": list(range(100, 160))}]
PARAMS = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, detokenize=False)


def _generate(path: str, tp: int) -> list[list[int]]:
    with LLM(path, tensor_parallel_size=tp, skip_tokenizer_init=True) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_two_ranks_match_one(tiny_checkpoints: dict[str, str], kind: str) -> None:
    single = _generate(tiny_checkpoints[kind], 1)
    assert all(len(t) == 16 for t in single)
    assert _generate(tiny_checkpoints[kind], 2) == single


def test_heads_must_divide_across_ranks(tiny_checkpoints: dict[str, str]) -> None:
    with pytest.raises(Exception, match="tensor_parallel_size=3"):
        LLM(tiny_checkpoints["llama"], tensor_parallel_size=3, skip_tokenizer_init=True)


@pytest.mark.timeout(120)
def test_two_ranks_embed_like_one(embedding_model_path: str) -> None:
    """BERT's row-parallel layers carry a bias: added once, after the all-reduce."""
    import torch

    sentences = ["A man is eating food.", "Two ranks split every layer of the encoder."]
    vectors = []
    for tp in (1, 2):
        with LLM(embedding_model_path, tensor_parallel_size=tp) as llm:
            vectors.append(torch.tensor([o.outputs.embedding for o in llm.embed(sentences)]))
    assert torch.allclose(vectors[0], vectors[1], atol=1e-5)
