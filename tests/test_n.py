"""`n > 1` and seeds: n completions of one prompt in one output, the prompt prefilled once,
child i seeded with seed + i, aborts reaching every child, and seeded requests that give
the same tokens whatever else runs with them."""

from __future__ import annotations

import asyncio
import time

import pytest

from zllm import AsyncLLM, EngineArgs, RequestOutputKind, SamplingParams

PROMPT = {"prompt_token_ids": list(range(1000, 1100))}  # 100 tokens: 6 full blocks of 16 + 4


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    engine = AsyncLLM(
        EngineArgs(model=tiny_checkpoints["llama"], distributed_executor_backend="uni")
    )
    yield engine
    engine.shutdown()


async def _collect(engine, prompt, params: SamplingParams, request_id: str | None = None):
    request_id = request_id or f"n{time.monotonic_ns()}-{id(params)}"
    return [out async for out in engine.generate(prompt, params, request_id)]


def _tokens_by_index(outputs, kind: RequestOutputKind) -> dict[int, list[int]]:
    """Per completion index: all its tokens, however the kind streamed them."""
    tokens: dict[int, list[int]] = {}
    for output in outputs:
        for completion in output.outputs:
            if kind == RequestOutputKind.DELTA:
                tokens.setdefault(completion.index, []).extend(completion.token_ids)
            else:
                tokens[completion.index] = list(completion.token_ids)
    return tokens


@pytest.mark.timeout(120)
def test_n4_four_completions_prefilled_once_seeded_like_vllm(engine) -> None:
    params = SamplingParams(n=4, seed=11, temperature=1.0, max_tokens=6)

    async def run():
        before = await engine.get_stats()
        outputs = await _collect(
            engine, PROMPT, params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
        )
        after = await engine.get_stats()
        singles = await asyncio.gather(
            *(_collect(engine, PROMPT, SamplingParams(seed=11 + i, max_tokens=6)) for i in range(4))
        )
        return before, outputs, after, singles

    before, outputs, after, singles = asyncio.run(run())
    assert len(outputs) == 1 and outputs[0].finished
    completions = outputs[0].outputs
    assert [c.index for c in completions] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in completions)
    # The prompt ran through the model about once: each other child recomputes only the
    # partial last block (4 tokens), the full blocks come from the prefix cache.
    prefilled = after.num_prefill_tokens - before.num_prefill_tokens
    assert 100 <= prefilled <= 100 + 3 * 16, prefilled
    # Child i is the request with seed + i (vLLM), so the completions differ.
    assert [c.token_ids for c in completions] == [s[-1].outputs[0].token_ids for s in singles]
    assert len({tuple(c.token_ids) for c in completions}) == 4


@pytest.mark.timeout(120)
def test_n4_every_output_kind_gives_the_same_completions(engine) -> None:
    params = SamplingParams(n=4, seed=5, temperature=0.9, max_tokens=8)

    async def run():
        runs = [
            _collect(engine, PROMPT, params.clone(output_kind=kind)) for kind in RequestOutputKind
        ]
        return dict(zip(RequestOutputKind, await asyncio.gather(*runs)))

    runs = asyncio.run(run())
    results = {}
    for kind, outputs in runs.items():
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        results[kind] = _tokens_by_index(outputs, kind)
        assert sorted(results[kind]) == [0, 1, 2, 3]
        assert {c.finish_reason for c in outputs[-1].outputs} <= {"length"}
    assert results[RequestOutputKind.DELTA] == results[RequestOutputKind.CUMULATIVE]
    assert results[RequestOutputKind.CUMULATIVE] == results[RequestOutputKind.FINAL_ONLY]
    # CUMULATIVE shows all n every time; text streamed by DELTA adds up to the final text.
    assert all(len(o.outputs) == 4 for o in runs[RequestOutputKind.CUMULATIVE])
    final = {c.index: c.text for c in runs[RequestOutputKind.FINAL_ONLY][0].outputs}
    delta: dict[int, str] = {}
    for output in runs[RequestOutputKind.DELTA]:
        for c in output.outputs:
            delta[c.index] = delta.get(c.index, "") + c.text
    assert delta == final


@pytest.mark.timeout(120)
def test_abort_of_the_request_aborts_every_child(engine) -> None:
    params = SamplingParams(n=4, max_tokens=900, ignore_eos=True)

    async def run():
        before = await engine.get_stats()
        outputs = []
        async for out in engine.generate(PROMPT, params, "parent"):
            outputs.append(out)
            if len(outputs) == 2:
                await engine.abort("parent")
        # The engine drops all four children: nothing is left running.
        deadline = time.monotonic() + 30
        while (stats := await engine.get_stats()).num_running + stats.num_waiting:
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.05)
        return before, outputs, stats

    before, outputs, after = asyncio.run(run())
    assert outputs[-1].finished
    assert [c.finish_reason for c in outputs[-1].outputs] == ["abort"] * 4
    assert after.num_steps - before.num_steps < 100  # far from the 900 a survivor would run


@pytest.mark.timeout(120)
def test_seeded_request_same_tokens_alone_and_in_a_mixed_batch_of_16(engine) -> None:
    seeded = SamplingParams(seed=1234, temperature=1.0, top_p=0.95, max_tokens=24)
    prompt = {"prompt_token_ids": list(range(500, 537))}
    others = [
        SamplingParams(temperature=0, max_tokens=20),
        SamplingParams(temperature=0.7, top_k=20, max_tokens=30),
        SamplingParams(temperature=1.3, min_p=0.05, max_tokens=16),
        SamplingParams(seed=99, temperature=1.0, max_tokens=28),
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, max_tokens=24),
        SamplingParams(frequency_penalty=1.0, temperature=0.5, max_tokens=12),
        SamplingParams(logit_bias={7: 5.0, 9: -5.0}, max_tokens=24),
        SamplingParams(logprobs=3, temperature=0.8, max_tokens=20),
        SamplingParams(min_tokens=10, max_tokens=26, top_p=0.5),
        SamplingParams(n=2, temperature=1.0, max_tokens=10),
        SamplingParams(temperature=2.0, top_k=3, max_tokens=24),
        SamplingParams(seed=1234, temperature=0.3, max_tokens=24),  # same seed, other params
        SamplingParams(max_tokens=40),
        SamplingParams(temperature=0, logprobs=0, max_tokens=18),
    ]

    async def run():
        alone = await _collect(engine, prompt, seeded)
        batch = [
            _collect(engine, {"prompt_token_ids": list(range(200 + 13 * i, 230 + 17 * i))}, p)
            for i, p in enumerate(others)
        ]
        batch.insert(7, _collect(engine, prompt, seeded))
        return alone, await asyncio.gather(*batch)

    alone, batch = asyncio.run(run())
    assert len(batch) == 15 and sum(p.n for p in others) + 1 == 16
    assert batch[7][-1].outputs[0].token_ids == alone[-1].outputs[0].token_ids
    assert len(set(alone[-1].outputs[0].token_ids)) > 5  # it is really sampling
