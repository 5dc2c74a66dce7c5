"""Property: every request either raises at submission, or ends (with its outputs or an error)
within its timeout; none waits forever, and the engine keeps serving. Hypothesis draws the
prompts and sampling params, valid and not, including params changed after construction."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripts.scenario_process import single_threaded_engines

from zllm import AsyncLLM, EngineArgs, SamplingParams
from zllm.frontend.errors import EngineOverloadedError

VOCAB = 49152  # the tiny checkpoints use the default model's tokenizer
REQUEST_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    with single_threaded_engines():
        engine = AsyncLLM(
            EngineArgs(
                model=tiny_checkpoints["llama"],
                distributed_executor_backend="uni",
                kv_cache_memory_bytes=2**24,
                max_model_len=64,  # max_tokens=None stays short
                max_queued_requests=64,
            )
        )
    yield engine
    engine.shutdown()


token = st.integers(-3, VOCAB + 3)
token_lists = st.lists(token, max_size=40)
odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(-2, 10), max_size=3),
    st.builds(np.int64, st.integers(-5, 100)),
)
prompts = st.one_of(
    st.text(max_size=60),  # includes lone surrogates: refused as not valid Unicode
    token_lists,
    token_lists.map(np.array),
    st.lists(st.floats(0, 100), min_size=1, max_size=5),
    st.builds(lambda ids: {"prompt_token_ids": ids}, token_lists),
    st.builds(lambda t: {"prompt": t}, st.text(max_size=30)),
    st.builds(lambda ids: {"prompt_token_ids": ids, "multi_modal_data": {}}, token_lists),
    odd_values,
)
params_kwargs = st.fixed_dictionaries(
    {},
    optional={
        "n": st.integers(0, 3),
        "temperature": st.floats(-1, 2),
        "top_p": st.floats(-0.5, 1.5),
        "top_k": st.integers(-2, 50),
        "min_p": st.floats(-0.1, 1.1),
        "max_tokens": st.one_of(st.none(), st.integers(-1, 10)),
        "min_tokens": st.integers(-1, 12),
        "seed": st.one_of(st.none(), st.integers(-(2**64), 2**64)),
        "stop": st.one_of(
            st.none(), st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)
        ),
        "stop_token_ids": st.lists(token, max_size=2),
        "logprobs": st.one_of(st.none(), st.integers(-2, 25)),
        "prompt_logprobs": st.one_of(st.none(), st.integers(-2, 25)),
        "presence_penalty": st.floats(-3, 3),
        "repetition_penalty": st.floats(-0.5, 2),
        "logit_bias": st.dictionaries(token, st.floats(-150, 150), max_size=2),
        "ignore_eos": st.booleans(),
    },
)
mutations = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "stop",
                "max_tokens",
                "n",
                "seed",
                "logprobs",
                "temperature",
                "stop_token_ids",
                "top_k",
            ]
        ),
        odd_values,
    ),
    max_size=2,
)


async def _run(engine: AsyncLLM, prompt, params) -> str:
    try:
        async for out in engine.generate(prompt, params):
            if out.finished:
                assert all(c.finish_reason for c in out.outputs)
                return "finished"
        return "ended without a finished output"
    except (ValueError, EngineOverloadedError):
        return "refused"


@pytest.mark.timeout(600)
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(prompt=prompts, kwargs=params_kwargs, changes=mutations)
def test_every_request_raises_or_ends(engine: AsyncLLM, prompt, kwargs, changes) -> None:
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError):
        return  # refused at construction, as vLLM does
    for field, value in changes:
        setattr(params, field, value)

    async def main() -> str:
        return await asyncio.wait_for(_run(engine, prompt, params), REQUEST_TIMEOUT_S)

    assert asyncio.run(main()) in ("finished", "refused")
    assert engine.is_running


@pytest.mark.timeout(120)
def test_the_engine_still_serves_after_the_fuzzing(engine: AsyncLLM) -> None:
    async def main() -> list[int]:
        async for out in engine.generate(
            "After the storm", SamplingParams(max_tokens=5, ignore_eos=True)
        ):
            if out.finished:
                return out.outputs[0].token_ids

    assert len(asyncio.run(main())) == 5
    deadline = time.monotonic() + 10  # aborts of requests the frontend stopped may be in flight
    while True:
        stats = asyncio.run(engine.get_stats())
        if (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0):
            break
        assert time.monotonic() < deadline, f"requests left behind in the engine: {stats}"
        time.sleep(0.1)
