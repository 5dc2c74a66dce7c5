"""The batched sampler draws from exactly the distribution vLLM defines for each setting.

No model: a fixed logits vector, 20k rows per setting in one call, and a chi-square test
against the distribution computed here by hand (p > 0.001).
"""

from __future__ import annotations

import math

import pytest
import torch

from zllm.protocol.sampling_params import SamplingParams
from zllm.worker.sampler import Sampler, SamplingRequest

N = 20_000
LOGITS = [2.0, 1.6, 1.3, 1.0, 0.7, 0.4, 0.1, -0.3, -0.8, -1.5, -2.2, -3.0]
V = len(LOGITS)
EOS = 11


def _row(params: SamplingParams, prompt=(), output=(), generator=None) -> SamplingRequest:
    return SamplingRequest(params, list(prompt), list(output), generator, [EOS])


def _draw(params: SamplingParams, logits=LOGITS, prompt=(), output=()) -> list[int]:
    sampler = Sampler(V, torch.device("cpu"))
    rows = [_row(params, prompt, output) for _ in range(N)]
    return sampler(torch.tensor([logits] * N), rows).token_ids.tolist()


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    e = [math.exp(x - top) if x > -math.inf else 0.0 for x in logits]
    return [x / sum(e) for x in e]


def _keep(probs: list[float], keep: list[bool]) -> list[float]:
    kept = [p if k else 0.0 for p, k in zip(probs, keep)]
    return [p / sum(kept) for p in kept]


def _assert_matches(samples: list[int], expected: list[float]) -> None:
    """Chi-square goodness of fit, p > 0.001; tokens of probability 0 must never appear."""
    counts = [0] * V
    for s in samples:
        counts[s] += 1
    for token, (c, p) in enumerate(zip(counts, expected)):
        assert p > 0 or c == 0, f"token {token} has probability 0 but was drawn {c} times"
    cells = [(c, p * len(samples)) for c, p in zip(counts, expected) if p > 0]
    chi2 = sum((c - e) ** 2 / e for c, e in cells)
    df = len(cells) - 1
    if df == 0:
        return
    p_value = torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(chi2 / 2.0)).item()
    assert p_value > 1e-3, f"chi2={chi2:.1f} df={df} p={p_value:.2g}\n{counts}\n{expected}"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)  # reproducible draws; the assertions hold for any seed


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature(temperature: float) -> None:
    expected = _softmax([x / temperature for x in LOGITS])
    _assert_matches(_draw(SamplingParams(temperature=temperature)), expected)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k(k: int) -> None:
    expected = _keep(_softmax([x / 0.8 for x in LOGITS]), [i < k for i in range(V)])
    _assert_matches(_draw(SamplingParams(temperature=0.8, top_k=k)), expected)


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_top_p(p: float) -> None:
    probs = _softmax(LOGITS)
    # The smallest set of best tokens whose mass reaches p (a token stays if the mass before it < p).
    keep = [sum(probs[:i]) < p for i in range(V)]
    _assert_matches(_draw(SamplingParams(top_p=p)), _keep(probs, keep))


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p(min_p: float) -> None:
    probs = _softmax([x / 1.5 for x in LOGITS])
    keep = [q >= min_p * max(probs) for q in probs]
    _assert_matches(_draw(SamplingParams(temperature=1.5, min_p=min_p)), _keep(probs, keep))


def test_min_p_then_top_k_then_top_p() -> None:
    """vLLM's order: min-p on the tempered distribution, then top-k, then top-p on what is left."""
    probs = _softmax([x / 1.5 for x in LOGITS])
    keep = [q >= 0.3 * max(probs) for q in probs]  # 6 tokens
    keep = [k and i < 8 for i, k in enumerate(keep)]
    kept = _keep(probs, keep)
    keep = [k and sum(kept[:i]) < 0.7 for i, k in enumerate(keep)]  # 4 (5 in another order)
    params = SamplingParams(temperature=1.5, min_p=0.3, top_k=8, top_p=0.7)
    _assert_matches(_draw(params), _keep(probs, keep))


def test_penalties() -> None:
    """Repetition over prompt and output tokens; frequency and presence over output tokens only."""
    prompt, output = [0, 4, 9], [1, 1, 4, 7]
    logits = list(LOGITS)
    for t in set(prompt) | set(output):
        logits[t] = logits[t] / 1.5 if logits[t] > 0 else logits[t] * 1.5
    for t in set(output):
        logits[t] -= 0.4 * output.count(t) + 0.3
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3)
    _assert_matches(_draw(params, prompt=prompt, output=output), _softmax(logits))


def test_logit_bias_and_min_tokens() -> None:
    """Bias is added to the logits; stop tokens (EOS here) are banned until min_tokens."""
    logits = list(LOGITS)
    logits[EOS] = 3.0  # EOS would be the favourite
    biased = list(logits)
    biased[5] += 2.5
    biased[0] -= 1.0
    expected = _softmax(biased[:EOS] + [-math.inf])
    params = SamplingParams(logit_bias={5: 2.5, 0: -1.0}, min_tokens=3)
    _assert_matches(_draw(params, logits=logits, output=[1, 2]), expected)
    # Once min_tokens are out, EOS is back.
    after = _draw(SamplingParams(min_tokens=3), logits=logits, output=[1, 2, 3])
    _assert_matches(after, _softmax(logits))


def test_greedy_is_argmax_in_a_mixed_batch() -> None:
    sampler = Sampler(50, torch.device("cpu"))
    logits = torch.randn(64, 50) * 3
    params = [
        SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=1.3, top_k=5)
        for i in range(64)
    ]
    out = sampler(logits.clone(), [_row(p) for p in params]).token_ids
    greedy = torch.arange(1, 64, 2)
    assert torch.equal(out[greedy], logits.argmax(dim=-1)[greedy])
    all_greedy = sampler(logits.clone(), [_row(SamplingParams(temperature=0)) for _ in range(64)])
    assert torch.equal(all_greedy.token_ids, logits.argmax(dim=-1))


def test_seeded_row_ignores_the_rest_of_the_batch() -> None:
    """A seeded row draws from its own generator: same tokens alone or among others."""
    sampler = Sampler(V, torch.device("cpu"))
    params = SamplingParams(temperature=1.0, seed=7)

    def run(batch: int, position: int) -> list[int]:
        generator = torch.Generator().manual_seed(7)
        tokens = []
        for _ in range(40):
            rows = [_row(SamplingParams(temperature=0.7, top_p=0.8)) for _ in range(batch)]
            rows[position] = _row(params, generator=generator)
            tokens.append(sampler(torch.tensor([LOGITS] * batch), rows).token_ids[position].item())
        return tokens

    alone = run(1, 0)
    assert run(9, 4) == alone
    assert run(16, 15) == alone
    assert len(set(alone)) > 3  # it is really sampling


def test_allowed_token_ids_and_bad_words() -> None:
    """Only allowed tokens are drawn; a bad word's last token is banned right after its other
    tokens were generated, a one-token bad word always."""
    params = SamplingParams(
        allowed_token_ids=[1, 4, 6, 9], _bad_words_token_ids=[[3, 4], [9], [8, 6]]
    )
    expected = _keep(_softmax(LOGITS), [t in (1, 6) for t in range(V)])  # 4 after 3; never 9
    _assert_matches(_draw(params, output=[2, 3]), expected)
    # a mixed greedy batch: the limited row gets its best allowed token, the other its argmax
    sampler = Sampler(V, torch.device("cpu"))
    rows = [
        _row(SamplingParams(temperature=0, allowed_token_ids=[5, 7])),
        _row(SamplingParams(temperature=0)),
    ]
    assert sampler(torch.tensor([LOGITS] * 2), rows).token_ids.tolist() == [5, 0]
