"""Pooling requests in the engine's step, driven directly (EngineCore + in-process worker):
prefill-only, batched with each other and with generation in the same step, blocks freed in
the step that pools, no prefix cache for bidirectional attention, encoder prompts never split.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import checkpoint_variant, sentence_transformers_files

from zllm.core.engine_core import EngineCore
from zllm.core.executor import create_executor
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.messages import AddRequest, RequestUpdate
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

CLIENT = b"client"
POOL = PoolingParams(normalize=True)


def engine_core(path: str, **kwargs) -> EngineCore:
    args = EngineArgs(model=path, distributed_executor_backend="uni", **kwargs)
    config = ModelConfig.from_path(path, runner=args.resolved_runner())
    return EngineCore(args, config, create_executor(args, config))


def add(core: EngineCore, rid: str, ids: list[int], params) -> RequestUpdate | None:
    kind = "pooling_params" if isinstance(params, PoolingParams) else "sampling_params"
    return core.add_request(
        CLIENT, AddRequest(request_id=rid, prompt_token_ids=ids, **{kind: params})
    )


def vector(update: RequestUpdate) -> torch.Tensor:
    return torch.frombuffer(bytearray(update.pooled), dtype=torch.float32)


def step(core: EngineCore) -> dict[str, RequestUpdate]:
    return {u.request_id: u for _, u in core.step()}


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [101] + [rng.randrange(1000, 20000) for _ in range(length - 2)] + [102] for _ in range(n)
    ]


@pytest.fixture(scope="module")
def encoder(embedding_model_path):
    core = engine_core(embedding_model_path, max_num_batched_tokens=64)
    yield core
    core.shutdown()


@pytest.fixture(scope="module")
def decoder_mean(tiny_checkpoints, tmp_path_factory) -> str:
    """The tiny Llama as a sentence-transformers model with mean pooling (its LM head kept)."""
    out = tmp_path_factory.mktemp("mean") / "llama-mean"
    return str(
        checkpoint_variant(tiny_checkpoints["llama"], out, sentence_transformers_files("mean", 64))
    )


# ---- encoders ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_encoder_requests_run_together_and_free_their_blocks_in_that_step(encoder) -> None:
    before = encoder.stats().num_steps
    batch = prompts(4, 12)
    for i, ids in enumerate(batch):
        assert add(encoder, f"e{i}", ids, POOL) is None
    updates = step(encoder)
    assert sorted(updates) == [f"e{i}" for i in range(4)]
    assert all(u.finish_reason == "stop" and u.new_token_ids == [] for u in updates.values())
    assert all(vector(u).shape == (384,) for u in updates.values())
    stats = encoder.stats()
    assert stats.num_steps == before + 1
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and not encoder.scheduler.requests
    # One at a time gives the same vectors: padding in the batched step changes nothing.
    for i, ids in enumerate(batch[:2]):
        add(encoder, f"alone{i}", ids, POOL)
        alone = vector(step(encoder)[f"alone{i}"])
        assert torch.allclose(alone, vector(updates[f"e{i}"]), atol=1e-6)


@pytest.mark.timeout(60)
def test_encoders_never_read_or_fill_the_prefix_cache(encoder) -> None:
    assert encoder.kv.enable_prefix_caching  # on, yet it does not apply
    ids = prompts(1, 40, seed=1)[0]  # more than two full blocks
    queries = encoder.stats().prefix_cache_queries
    first = step(encoder) if add(encoder, "p1", ids, POOL) is None else {}
    add(encoder, "p2", ids, POOL)
    second = step(encoder)
    assert first["p1"].num_cached_tokens == second["p2"].num_cached_tokens == 0
    assert encoder.kv.cached == {}
    assert encoder.stats().prefix_cache_queries == queries
    assert torch.equal(vector(first["p1"]), vector(second["p2"]))


@pytest.mark.timeout(60)
def test_an_encoder_prompt_is_never_split_over_steps(encoder) -> None:
    """Budget 64 tokens: a 40-token prompt waits for the next step rather than be chunked, and
    one longer than a step is refused at admission."""
    a, b = prompts(2, 40, seed=2)
    add(encoder, "a", a, POOL)
    add(encoder, "b", b, POOL)
    assert list(step(encoder)) == ["a"]
    assert encoder.scheduler.stats().num_scheduled_tokens == 40
    assert list(step(encoder)) == ["b"]
    refused = add(encoder, "long", prompts(1, 65)[0], POOL)
    assert refused is not None and "max_num_batched_tokens=64" in refused.error


@pytest.mark.timeout(60)
def test_engine_core_refuses_what_the_model_cannot_do(encoder) -> None:
    refused = add(encoder, "g", [101, 2000, 102], SamplingParams(max_tokens=2))
    assert refused is not None and "needs a generative model" in refused.error
    neither = encoder.add_request(CLIENT, AddRequest(request_id="x", prompt_token_ids=[101]))
    assert neither is not None and "sampling_params or pooling_params" in neither.error
    too_long = add(encoder, "t", [101] * 257, POOL)
    assert too_long is not None and "max_model_len=256" in too_long.error


# ---- decoders ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_pooling_rides_in_the_same_step_as_running_generation(tiny_checkpoints) -> None:
    core = engine_core(tiny_checkpoints["llama"], kv_cache_memory_bytes=2**22)
    try:
        assert core.model_config.supported_tasks == ["generate", "embed"]
        gen = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        for i, ids in enumerate(prompts(2, 10, seed=3)):
            add(core, f"g{i}", ids, gen)
        step(core)  # the generations' prefill
        pooled = prompts(3, 9, seed=4)
        for i, ids in enumerate(pooled):
            add(core, f"p{i}", ids, POOL)
        steps = core.stats().num_steps
        mixed = step(core)
        assert core.stats().num_steps == steps + 1
        assert sorted(mixed) == ["g0", "g1", "p0", "p1", "p2"]  # decodes and pools, one step
        assert all(len(mixed[f"g{i}"].new_token_ids) == 1 for i in range(2))
        assert core.stats().num_running == 2  # the pooling requests are gone...
        assert core.stats().kv_blocks_used == 2  # ...with their blocks: one per generation
        # The same prompts pooled alone give the same vectors.
        for i, ids in enumerate(pooled):
            add(core, f"alone{i}", ids, POOL)
        alone = step(core)
        for i in range(3):
            assert torch.allclose(vector(alone[f"alone{i}"]), vector(mixed[f"p{i}"]), atol=1e-5)
    finally:
        core.shutdown()


@pytest.mark.timeout(60)
def test_a_chunked_mean_pooled_prompt_holds_blocks_until_its_last_chunk(decoder_mean) -> None:
    """A decoder's prompt may take several steps; mean pooling folds every chunk in, reads no
    cached prefix (it needs every position), and frees the blocks in the step that pools."""
    ids = prompts(1, 40, seed=5)[0]
    whole = engine_core(decoder_mean, kv_cache_memory_bytes=2**22)
    try:
        add(whole, "w", ids, POOL)
        reference = vector(step(whole)["w"])
    finally:
        whole.shutdown()
    core = engine_core(decoder_mean, kv_cache_memory_bytes=2**22, max_num_batched_tokens=16)
    try:
        assert core.model_config.pooler_config.pooling_type == "MEAN"
        for rid in ("first", "again"):  # the second finds the first's blocks cached, reads none
            add(core, rid, ids, POOL)
            assert step(core) == {} and core.stats().kv_blocks_used == 1
            assert step(core) == {} and core.stats().kv_blocks_used == 2
            done = step(core)[rid]
            assert core.stats().kv_blocks_used == 0
            assert done.num_cached_tokens == 0
            assert torch.allclose(vector(done), reference, atol=1e-5)
    finally:
        core.shutdown()


@pytest.mark.timeout(60)
def test_last_token_pooling_reads_the_prefix_cache(tiny_checkpoints) -> None:
    core = engine_core(tiny_checkpoints["llama"], kv_cache_memory_bytes=2**22)
    try:
        assert core.model_config.pooler_config.pooling_type == "LAST"
        ids = prompts(1, 40, seed=6)[0]
        add(core, "a", ids, POOL)
        first = step(core)["a"]
        add(core, "b", ids, POOL)
        second = step(core)["b"]
        assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 32)
        assert torch.allclose(vector(first), vector(second), atol=1e-5)
    finally:
        core.shutdown()
