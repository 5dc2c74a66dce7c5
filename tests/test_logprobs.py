"""Logprobs and prompt logprobs are transformers' log-softmax of the same checkpoint (float32,
CPU, within 1e-3), shaped as vLLM shapes them, across chunked prefill and the prefix cache."""

from __future__ import annotations

import pytest
import torch

from zllm import LLM, SamplingParams

PROMPT = list(range(300, 380))  # 80 tokens: three prefill chunks of at most 32
TOL = 1e-3


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    llm = LLM(
        tiny_checkpoints["llama"],
        distributed_executor_backend="uni",
        max_num_batched_tokens=32,
        max_logprobs=-1,  # logprobs=-1 (the whole vocabulary) below
    )
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """token ids -> [len, V] log-softmax of transformers' logits at each position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    model.eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    return run


def _check_entry(entry: dict, token: int, row: torch.Tensor, k: int) -> None:
    """One position: the token with its logprob and rank, and the k best, as vLLM gives them."""
    assert abs(entry[token].logprob - row[token].item()) < TOL
    value = row[token]  # rank: 1 + how many tokens are better (ties within TOL either way)
    assert (
        int((row > value + TOL).sum()) + 1 <= entry[token].rank <= int((row >= value - TOL).sum())
    )
    top = row.topk(k)
    assert set(entry) <= set(top.indices.tolist()) | {token}
    assert len(entry) in (k, k + 1)
    for rank, (tid, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
        if tid in entry and tid != token:
            assert abs(entry[tid].logprob - value) < TOL and entry[tid].rank == rank


@pytest.mark.timeout(120)
def test_greedy_and_prompt_logprobs_match_transformers(llm, reference) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, prompt_logprobs=4)
    out = llm.generate({"prompt_token_ids": PROMPT}, params)[0]
    completion = out.outputs[0]
    tokens = completion.token_ids
    ref = reference(PROMPT + tokens)

    assert len(completion.logprobs) == len(tokens) == 6
    for i, (token, entry) in enumerate(zip(tokens, completion.logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        assert token == int(row.argmax())
        _check_entry(entry, token, row, 5)
        assert entry[token].rank == 1
    total = sum(e[t].logprob for t, e in zip(tokens, completion.logprobs))
    assert abs(completion.cumulative_logprob - total) < TOL

    # [None, then one dict per prompt token], computed across the three prefill chunks.
    assert len(out.prompt_logprobs) == len(PROMPT) and out.prompt_logprobs[0] is None
    for j in range(1, len(PROMPT)):
        _check_entry(out.prompt_logprobs[j], PROMPT[j], ref[j - 1], 4)


@pytest.mark.timeout(120)
def test_sampled_logprobs_are_of_the_raw_distribution(llm, reference) -> None:
    """As vLLM by default: temperature, top-k and penalties change the draw, not the logprobs."""
    params = SamplingParams(
        temperature=0.5, top_k=3, repetition_penalty=1.5, seed=3, max_tokens=5, logprobs=2
    )
    completion = llm.generate({"prompt_token_ids": PROMPT}, params)[0].outputs[0]
    ref = reference(PROMPT + completion.token_ids)
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        _check_entry(entry, token, ref[len(PROMPT) - 1 + i], 2)


@pytest.mark.timeout(120)
def test_prompt_logprobs_of_a_cached_prompt_and_logprob_counts(llm, reference) -> None:
    prompt = list(range(600, 650))
    ref = reference(prompt)
    outs = llm.generate(
        [{"prompt_token_ids": prompt}] * 2,
        [SamplingParams(max_tokens=1), SamplingParams(max_tokens=1)],
    )
    assert outs[0].prompt_logprobs is None and outs[0].outputs[0].logprobs is None
    # The prompt's blocks are cached now; prompt logprobs still cover every position.
    outs = llm.generate(
        [{"prompt_token_ids": prompt}] * 3,
        [
            SamplingParams(max_tokens=2, prompt_logprobs=0, logprobs=0),
            SamplingParams(max_tokens=1, logprobs=-1),
            SamplingParams(max_tokens=2),
        ],
    )
    assert len(outs[0].prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        entry = outs[0].prompt_logprobs[j]
        assert list(entry) == [prompt[j]]  # prompt_logprobs=0: only the actual token
        assert abs(entry[prompt[j]].logprob - ref[j - 1, prompt[j]].item()) < TOL
    assert all(len(e) == 1 for e in outs[0].outputs[0].logprobs)
    whole = outs[1].outputs[0].logprobs[0]
    assert len(whole) == ref.shape[1]  # -1: the whole vocabulary
    assert outs[2].outputs[0].logprobs is None and outs[2].prompt_logprobs is None
