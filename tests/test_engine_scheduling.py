"""The scheduler and KV cache behind real models: what a user notices.

Greedy outputs must not depend on prefix caching, chunked prefill or preemption; a shared
prefix must be served from the cache; aborted requests must give back every block; requests
that cannot fit must be refused with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from zllm import LLM, AsyncLLM, EngineArgs, SamplingParams
from zllm.frontend.engine_router import EngineRouter
from zllm.frontend.input_processor import ProcessedRequest
from zllm.protocol.config import ModelConfig
from zllm.protocol.messages import SchedulerStats

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def kv_bytes(path: str, num_blocks: int, block_size: int = 16) -> int:
    """`kv_cache_memory_bytes` for exactly `num_blocks` float32 blocks of this model."""
    c = ModelConfig.from_path(path)
    return (
        num_blocks * 2 * block_size * c.num_key_value_heads * c.head_dim * 4 * c.num_hidden_layers
    )


def engine(path: str, num_blocks: int, **kwargs) -> LLM:
    return LLM(
        path,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=kv_bytes(path, num_blocks),
        **kwargs,
    )


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def run_workload(llm: LLM) -> list[list[int]]:
    """Two waves of prompts that share prefixes (whole blocks, block edges, duplicates, and a
    prompt that continues an earlier output), long enough to be chunked at 32 tokens."""
    rng = random.Random(0)
    base = ids(rng, 40)
    wave1 = [
        base + ids(rng, 5),
        base[:32],  # ends on a block edge: its last block is always recomputed
        base + ids(rng, 30),
        base + ids(rng, 5),
        ids(rng, 70),
        base[:16] + ids(rng, 3),
        ids(rng, 7),
        base,
    ]
    wave1[3] = wave1[0]  # the same prompt twice in one batch
    out1 = [o.outputs[0].token_ids for o in llm.generate(_prompts(wave1), GREEDY)]
    wave2 = [wave1[0], wave1[1], wave1[2] + out1[2], wave1[4][:48] + ids(rng, 5), ids(rng, 20)]
    out2 = [o.outputs[0].token_ids for o in llm.generate(_prompts(wave2), GREEDY)]
    return out1 + out2


def _prompts(token_lists: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": t} for t in token_lists]


# ---- greedy outputs do not depend on how the work is scheduled -----------------------------


@pytest.fixture(scope="module")
def llama(tiny_checkpoints) -> str:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def prefix_llm(llama):
    """Prefix caching on, default chunking; 60 blocks (960 tokens) < max_model_len (1024)."""
    with engine(llama, 60) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference_run(llama) -> tuple[list[list[int]], SchedulerStats]:
    with engine(llama, 256, enable_prefix_caching=False, enable_chunked_prefill=False) as llm:
        outputs = run_workload(llm)
        stats = llm.get_stats()
    assert stats.prefix_cache_hits == 0 and stats.num_preemptions == 0
    return outputs, stats


@pytest.fixture(scope="module")
def reference(reference_run) -> list[list[int]]:
    return reference_run[0]


@pytest.mark.timeout(120)
def test_prefix_caching_keeps_greedy_outputs(prefix_llm, reference) -> None:
    assert prefix_llm.reset_prefix_cache() is True
    before = prefix_llm.get_stats()
    assert run_workload(prefix_llm) == reference
    after = prefix_llm.get_stats()
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 200  # the cache was used


@pytest.mark.timeout(120)
def test_chunked_prefill_keeps_greedy_outputs(llama, reference_run) -> None:
    kwargs = dict(enable_prefix_caching=False, max_num_batched_tokens=32)
    with engine(llama, 256, enable_chunked_prefill=True, **kwargs) as llm:
        assert run_workload(llm) == reference_run[0]
        stats = llm.get_stats()
    # Each wave's prompts (~330 and ~230 tokens) took one step unchunked, 8 or more at 32.
    assert stats.num_steps >= reference_run[1].num_steps + 10, (stats, reference_run[1])


@pytest.mark.timeout(120)
def test_preemption_keeps_greedy_outputs(llama, reference) -> None:
    # The longest request needs 6 blocks; 8 cannot hold two of them.
    with engine(llama, 8) as llm:
        assert run_workload(llm) == reference
        stats = llm.get_stats()
    assert stats.kv_blocks_total == 8
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_used == 0


def _alone_vs_together(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> None:
    """Each prompt alone (no cache hits, no preemption) must match all of them at once on a
    pool too small for the batch (hits, chunks and preemptions)."""
    alone = []
    for prompt in prompts:
        assert llm.reset_prefix_cache() is True
        alone += [o.outputs[0].token_ids for o in llm.generate(_prompts([prompt]), params)]
    before = llm.get_stats()
    assert before.num_preemptions == 0 and before.prefix_cache_hits == 0
    together = [o.outputs[0].token_ids for o in llm.generate(_prompts(prompts), params)]
    after = llm.get_stats()
    assert together == alone
    assert after.num_preemptions > 0 and after.prefix_cache_hits > 0
    assert after.kv_blocks_used == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_other_tiny_models_alone_match_together(tiny_checkpoints, kind: str) -> None:
    rng = random.Random(1)
    base = ids(rng, 36)
    prompts = [base + ids(rng, n) for n in (3, 20, 40, 9)] + [ids(rng, 50), base]
    with engine(tiny_checkpoints[kind], 8, max_num_batched_tokens=32) as llm:
        _alone_vs_together(llm, prompts, GREEDY)


@pytest.mark.timeout(240)
def test_default_model_alone_matches_together(default_model_path) -> None:
    # Prompts of ~27 tokens share a block and grow from 2 to 3 blocks over 8 new tokens: a
    # 4-block pool admits two at a time (chunks of 32 tokens) and must preempt as they grow.
    with engine(default_model_path, 4, max_num_batched_tokens=32) as llm:
        tok = llm.get_tokenizer()
        system = tok.encode(
            "You are a concise assistant for a geography and arithmetic quiz. "
            "Answer every question in one short sentence."
        )
        questions = [
            "What is the capital of France?",
            "What is 2+2?",
            "Which ocean is the largest?",
        ]
        prompts = [system + tok.encode(" " + q) for q in questions]
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        _alone_vs_together(llm, prompts, params)


# ---- prefix cache hit rate -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_shared_prefix_is_served_from_the_cache(prefix_llm) -> None:
    rng = random.Random(2)
    prefix = ids(rng, 200)
    prompts = [prefix + ids(rng, 10) for _ in range(16)]
    params = SamplingParams(max_tokens=4, temperature=0)
    assert prefix_llm.reset_prefix_cache() is True
    first = prefix_llm.generate(_prompts(prompts[:1]), params)[0]
    assert first.num_cached_tokens == 0
    before = prefix_llm.get_stats()
    outputs = prefix_llm.generate(_prompts(prompts[1:]), params)
    after = prefix_llm.get_stats()
    rates = [o.num_cached_tokens / len(o.prompt_token_ids) for o in outputs]
    assert min(rates) > 0.8, rates
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    assert queries == 15 * 210 and hits / queries > 0.8
    assert after.kv_blocks_used == 0


# ---- admission -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_requests_that_cannot_run_are_refused_at_the_frontend(prefix_llm) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        prefix_llm.generate(_prompts([[5] * 1024]), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_model_len"):
        prefix_llm.generate(_prompts([[5] * 10]), SamplingParams(max_tokens=1015))
    # Fits max_model_len (1024) but not the whole KV cache (60 blocks = 960 tokens).
    with pytest.raises(ValueError, match="KV blocks"):
        prefix_llm.generate(_prompts([[5] * 10]), SamplingParams(max_tokens=1000))
    assert prefix_llm.get_stats().num_waiting == 0
    assert len(prefix_llm.generate(_prompts([[5] * 10]), GREEDY)[0].outputs[0].token_ids) == 12


@pytest.mark.timeout(60)
def test_engine_core_refuses_what_can_never_fit(prefix_llm) -> None:
    """A client that skips the frontend checks gets an error back, not a request that waits
    forever for blocks."""
    stream = prefix_llm.client.add_request(
        ProcessedRequest("too-big", None, [5] * 10, SamplingParams(max_tokens=1000))
    )
    error = stream.get_blocking(timeout=30)
    assert isinstance(error, ValueError) and "KV blocks" in str(error)
    assert prefix_llm.get_stats().num_waiting == 0


# ---- aborts give every block back ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_leaving_the_loop_aborts_before_the_next_call(llama) -> None:
    """Closing the stream sends the abort at once, not when the garbage collector gets to
    the generators inside it: the engine has forgotten the request by the caller's next call."""
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)

    async def main() -> None:
        llm = AsyncLLM(EngineArgs(model=llama, distributed_executor_backend="uni"))
        try:
            router = EngineRouter({"m": [llm]})  # the same, through the router's generators
            for i, front in enumerate([llm, llm, router, router]):
                outputs = front.generate({"prompt_token_ids": [5, 6, 7]}, params, f"r{i}")
                async with contextlib.aclosing(outputs):
                    async for _ in outputs:
                        break
                stats = await llm.get_stats()
                assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
        finally:
            llm.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(180)
def test_aborted_requests_leave_no_blocks_in_use(llama) -> None:
    rng = random.Random(3)
    shared = ids(rng, 24)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def consume(llm: AsyncLLM, i: int, prompt: list[int], stop_after: int, mode: str):
        rid = f"abort-{i}"
        outputs = llm.generate({"prompt_token_ids": prompt}, params, rid)
        async with contextlib.aclosing(outputs):
            n = 0
            async for _ in outputs:
                n += 1
                if n >= stop_after:  # 9: never, the request finishes after 8 tokens
                    if mode == "abort":
                        await llm.abort(rid)
                    break  # leaving the loop aborts the request too

    plans = [
        (
            shared[: rng.randrange(25)] + ids(rng, rng.randrange(1, 30)),
            rng.randint(1, 9),
            rng.choice(["break", "abort", "cancel"]),
        )
        for _ in range(200)
    ]

    async def main() -> None:
        args = EngineArgs(
            model=llama,
            distributed_executor_backend="uni",
            kv_cache_memory_bytes=kv_bytes(llama, 24),
        )
        llm = AsyncLLM(args)
        try:
            tasks = {
                asyncio.create_task(consume(llm, i, *plan)): plan[2] for i, plan in enumerate(plans)
            }
            cancellable = [task for task, mode in tasks.items() if mode == "cancel"]
            pending = set(tasks)
            while pending:  # at every completion, cancel one more request mid-flight
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                live = [task for task in cancellable if not task.done()]
                if live:
                    rng.choice(live).cancel()
            for task in tasks:
                if not task.cancelled():
                    task.result()
            stats = await llm.get_stats()
            assert stats.num_preemptions > 0  # some aborts hit preempted requests
            assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
            assert await llm.reset_prefix_cache() is True
        finally:
            llm.shutdown()

    asyncio.run(main())
