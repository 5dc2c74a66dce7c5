"""SamplingParams: vLLM's defaults and normalisations; bad values are refused naming the field."""

from __future__ import annotations

import msgspec
import pytest

from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.5),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.1),
        ("repetition_penalty", 0.0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", -2),
        ("prompt_logprobs", -5),
        ("seed", 2**64),
        ("stop_token_ids", [-1]),
        ("stop", [""]),
        ("logit_bias", {5: 101.0}),
        ("logit_bias", {-1: 1.0}),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**{field: value})


def test_cross_field_rules() -> None:
    with pytest.raises(ValueError, match=r"SamplingParams\.min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    with pytest.raises(ValueError, match=r"SamplingParams\.stop"):
        SamplingParams(stop=["x"], detokenize=False)


def test_vllm_defaults_and_normalisation() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (
        1,
        1.0,
        1.0,
        0,
        0.0,
        16,
    )
    assert p.output_kind == RequestOutputKind.CUMULATIVE and p.logprobs is None
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(logit_bias={"3": 1}).logit_bias == {3: 1.0}
    # Greedy ignores the filters; tiny temperatures are raised to vLLM's floor.
    greedy = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2)
    assert greedy.greedy and (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=1e-4).temperature == pytest.approx(1e-2)
    assert SamplingParams(logprobs=-1).logprobs == -1  # the whole vocabulary


def test_round_trips_through_msgpack() -> None:
    p = SamplingParams(
        n=3, seed=5, stop=["a"], logit_bias={7: -2.0}, output_kind=RequestOutputKind.DELTA
    )
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams)
    assert back == p
