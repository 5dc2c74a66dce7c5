"""The admission rules both sides apply (protocol/admission.py), the core's reading of frames
that do not decode (core/client_frames.py), and the small pieces of start-up hygiene that
need no engine: addresses, the model cache, child seeds."""

from __future__ import annotations

import logging

import msgspec
import numpy as np
import pytest
import torch

from zllm import SamplingParams
from zllm.core.client_frames import FrameReader, RateLimitedLog, read_frame
from zllm.frontend.parallel_sampling import child_params
from zllm.protocol import messages as m
from zllm.protocol.admission import AdmissionLimits, canonical_request, request_error
from zllm.protocol.process import core_addresses

LIMITS = AdmissionLimits(
    max_model_len=64, vocab_size=100, block_size=16, num_kv_blocks=8, max_logprobs=20
)


def _error(ids, params: SamplingParams, request_id: str = "r", limits=LIMITS) -> str | None:
    return request_error(canonical_request(request_id, ids, params), limits)


# ---- the wire schema: canonical requests -------------------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [
        [5, 6, 7],
        (5, 6, 7),
        np.array([5, 6, 7]),
        np.array([5, 6, 7], dtype=np.int32),
        [np.int64(5), np.int16(6), np.uint8(7)],
        torch.tensor([5, 6, 7]),
        [torch.tensor(5), 6, 7],
    ],
    ids=lambda ids: type(ids).__name__ if not isinstance(ids, list) else repr(ids)[:30],
)
def test_numpy_and_torch_integers_become_plain_ints(ids) -> None:
    add = canonical_request("r", ids, SamplingParams())
    assert add.prompt_token_ids == [5, 6, 7]
    assert all(type(t) is int for t in add.prompt_token_ids)


@pytest.mark.parametrize(
    "ids,where",
    [
        ([1.0, 504.0], "prompt_token_ids[0]: expected `int`, got `float`"),
        ([1, 2, 3.5], "prompt_token_ids[2]: expected `int`, got `float`"),
        (np.array([1.0, 2.0]), "prompt_token_ids[0]: expected `int`, got `float`"),
        ([True, 2], "prompt_token_ids[0]: expected `int`, got `bool`"),
        (["1", 2], "prompt_token_ids[0]: expected `int`, got `str`"),
        ([[1, 2]], "prompt_token_ids[0]: expected `int`, got `array`"),
        ([2**70], "cannot be encoded"),
        ([object()], "cannot be encoded"),
    ],
)
def test_token_ids_that_are_not_integers_are_refused_with_their_index(ids, where) -> None:
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        canonical_request("r", ids, SamplingParams())


def test_sampling_params_changed_after_construction_are_checked_again() -> None:
    params = SamplingParams(max_tokens=5)
    params.stop = "\n"  # vLLM users do this: a single string
    params.stop_token_ids = [np.int64(2)]
    params.logit_bias = {np.int64(3): np.float32(1.5)}
    add = canonical_request("r", [1, 2], params)
    assert add.sampling_params.stop == ["\n"]
    assert add.sampling_params.stop_token_ids == [2]
    assert add.sampling_params.logit_bias == {3: 1.5}

    for field, value, words in [
        ("max_tokens", 0, "SamplingParams.max_tokens must be >= 1"),
        ("temperature", -1.0, "SamplingParams.temperature must be >= 0"),
        ("top_p", 0.0, "SamplingParams.top_p must be in (0, 1]"),
        ("n", 2.5, "SamplingParams.n: expected `int`, got `float`"),
        ("seed", 2**64, "cannot be encoded|SamplingParams.seed"),
        ("stop", [""], "SamplingParams.stop must be non-empty strings"),
        ("logprobs", "5", "SamplingParams.logprobs: expected `int | null`, got `str`"),
    ]:
        params = SamplingParams()
        setattr(params, field, value)
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            canonical_request("r", [1], params)


def test_not_sampling_params_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="sampling_params must be SamplingParams, got dict"):
        canonical_request("r", [1], {"max_tokens": 4})


# ---- the rules ------------------------------------------------------------------------------------


def test_the_rules_say_what_is_wrong() -> None:
    ok = SamplingParams(max_tokens=4)
    assert _error([1, 2], ok) is None
    assert "request id is 10240 bytes" in _error([1], ok, request_id="x" * 10240)
    assert _error([1], ok, request_id="é" * 128) is None  # 256 bytes: the limit itself
    assert "the prompt is empty" in _error([], ok)
    assert "max_model_len is 64" in _error(list(range(64)), ok)
    assert "exceeds max_model_len=64" in _error(list(range(61)), ok)
    assert "prompt_token_ids[1] = 100 is outside the vocabulary [0, 100)" in _error([1, 100], ok)
    assert "prompt_token_ids[0] = -1" in _error([-1], ok)
    assert "SamplingParams.stop_token_ids: token id 100" in _error(
        [1], SamplingParams(stop_token_ids=[100])
    )
    assert "SamplingParams.logit_bias: token id 250" in _error(
        [1], SamplingParams(logit_bias={250: 1})
    )
    small = msgspec.structs.replace(LIMITS, num_kv_blocks=1)
    assert "needs 2 KV blocks" in _error([1] * 10, SamplingParams(max_tokens=10), limits=small)


def test_logprobs_are_capped_by_max_logprobs() -> None:
    assert _error([1], SamplingParams(logprobs=20, prompt_logprobs=20)) is None
    assert "SamplingParams.logprobs=21 is more than max_logprobs=20" in _error(
        [1], SamplingParams(logprobs=21)
    )
    whole = _error([1], SamplingParams(prompt_logprobs=-1))
    assert "prompt_logprobs=-1 (the whole vocabulary, 100) is more than max_logprobs=20" in whole
    uncapped = msgspec.structs.replace(LIMITS, max_logprobs=-1)
    assert _error([1], SamplingParams(logprobs=-1, prompt_logprobs=-1), limits=uncapped) is None


def test_child_seeds_wrap_in_64_bits() -> None:
    top = 2**63 - 1
    params = SamplingParams(n=3, seed=top, temperature=1.0)
    assert [child_params(params, i).seed for i in range(3)] == [top, -(2**63), -(2**63) + 1]


# ---- frames the core cannot decode ---------------------------------------------------------------


def _add(request_id: str, ids) -> dict:
    return {
        "type": "AddRequest",
        "request_id": request_id,
        "prompt_token_ids": ids,
        "sampling_params": {},
    }


def test_one_bad_request_in_a_frame_costs_only_itself() -> None:
    frame = msgspec.msgpack.encode(
        {
            "type": "AddRequests",
            "requests": [_add(f"ok{i}", [1, 2]) for i in range(9)] + [_add("bad", [1.0, 504.0])],
        }
    )
    message, answer = read_frame(frame)
    assert [a.request_id for a in message.requests] == [f"ok{i}" for i in range(9)]
    [refused] = answer.updates
    assert refused.request_id == "bad" and refused.finish_reason == "error"
    assert "prompt_token_ids[0]: expected `int`, got `float`" in refused.error
    assert answer.frame_error is None


def test_frames_that_name_nothing_are_still_answered() -> None:
    reader = FrameReader(logging.getLogger("test"))
    reader.limits = LIMITS
    cases = {
        b"\xc1": m.FrameRejected,
        msgspec.msgpack.encode(
            {"type": "AddRequests", "requests": [{"prompt_token_ids": 1}]}
        ): m.FrameRejected,
        msgspec.msgpack.encode({"type": "UtilityCall", "call_id": 7, "method": 3}): m.UtilityReply,
        msgspec.msgpack.encode(_add("r", "abc")): m.StepOutputs,
    }
    for frame, answer_type in cases.items():
        message, replies = reader.read([b"client", frame])
        assert message is None
        [(client, reply)] = replies
        assert client == b"client"
        assert type(m.decode_core_message(reply)) is answer_type
    assert reader.num_rejected == len(cases)
    message, replies = reader.read([b"client", b"two", b"frames"])
    assert message is None and isinstance(m.decode_core_message(replies[0][1]), m.FrameRejected)


def test_the_reader_screens_requests_before_the_busy_loop_sees_them() -> None:
    reader = FrameReader(logging.getLogger("test"))
    good = m.AddRequest(request_id="good", prompt_token_ids=[1], sampling_params=SamplingParams())
    bad = m.AddRequest(request_id="bad", prompt_token_ids=[500], sampling_params=SamplingParams())
    message, replies = reader.read([b"c", m.encode(m.AddRequests(requests=[good, bad]))])
    assert message is None, "nothing runs before the engine is ready"
    [updates] = [m.decode_core_message(r[1]).updates for r in replies]
    assert all("not ready" in u.error for u in updates)
    reader.limits = LIMITS
    message, replies = reader.read([b"c", m.encode(m.AddRequests(requests=[good, bad]))])
    assert message.requests == [good]
    [update] = m.decode_core_message(replies[0][1]).updates
    assert update.request_id == "bad" and "outside the vocabulary" in update.error
    assert reader.num_rejected == 0, "a request the rules refuse is not an undecodable frame"


def test_rate_limited_log_counts_what_it_does_not_print(caplog) -> None:
    log = RateLimitedLog(logging.getLogger("zllm.test"), interval=3600, burst=3)
    with caplog.at_level(logging.WARNING, logger="zllm.test"):
        for i in range(1000):
            log.warning("frame %d", i)
    assert len(caplog.records) == 3 and log.suppressed == 997


# ---- addresses --------------------------------------------------------------------------------------


def test_engine_core_addresses_are_checked() -> None:
    assert core_addresses("tcp://127.0.0.1:5000") == (
        "tcp://127.0.0.1:5000",
        "tcp://127.0.0.1:5001",
    )
    assert core_addresses("ipc:///run/zllm/core") == (
        "ipc:///run/zllm/core.in",
        "ipc:///run/zllm/core.out",
    )
    for bad, words in [
        ("tcp://127.0.0.1:65535", "PORT must be in \\[1, 65534\\]"),
        ("tcp://127.0.0.1:0", "out of range"),
        ("tcp://127.0.0.1", "tcp://HOST:PORT"),
        ("tcp://:80", "tcp://HOST:PORT"),
        ("udp://127.0.0.1:80", "ipc:///path/name or tcp://host:port"),
        ("/run/zllm/core", "ipc:///path/name or tcp://host:port"),
        ("ipc://", "ipc:///path/name or tcp://host:port"),
    ]:
        with pytest.raises(ValueError, match=words):
            core_addresses(bad)
