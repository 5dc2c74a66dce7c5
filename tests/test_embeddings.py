"""Embeddings through the public API, against sentence-transformers in float32.

all-MiniLM-L6-v2 (a BERT encoder, mean pooling, normalized) is the default embedding model;
SmolLM2 with a sentence-transformers config (last-token pooling) is a decoder embedder, which
also generates: its embeddings must not change while generation runs in the same steps.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import checkpoint_variant, sentence_transformers_files

from zllm import (
    LLM,
    AsyncLLM,
    EmbeddingRequestOutput,
    EngineArgs,
    PoolingParams,
    PoolingRequestOutput,
    SamplingParams,
)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The girl is carrying a baby.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Two men pushed carts through the woods.",
    "A cheetah is running behind its prey.",
    "The new movie is awesome, I loved every minute of it!",
    "Paris is the capital and most populous city of France.",
    "Embeddings map text to points in a vector space where distance means something.",
    "It rained all night; by morning the river had burst its banks.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Quantum computers use qubits, which can be in superpositions of states.",
    "She sells sea shells by the sea shore.",
    "The stock market fell sharply after the central bank raised interest rates again.",
    "¿Dónde está la biblioteca?",
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Hi",
]
COSINE_BAR = 1 - 1e-5


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def reference(path: str, sentences: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    return model.encode(sentences, convert_to_tensor=True, batch_size=len(sentences)).float()


def vectors(outputs: list[EmbeddingRequestOutput]) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outputs])


@pytest.fixture(scope="module")
def minilm():
    llm = LLM("sentence-transformers/all-MiniLM-L6-v2")  # the packaged model, by its hub name
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def minilm_reference(embedding_model_path) -> torch.Tensor:
    return reference(embedding_model_path, SENTENCES)


# ---- the default embedding model ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_minilm_matches_sentence_transformers(minilm, minilm_reference) -> None:
    assert minilm.model_config.architecture == "BertModel"
    assert minilm.model_config.supported_tasks == ["embed"]
    outputs = minilm.embed(SENTENCES)  # one step: every prompt padded into one batch
    assert [type(o) for o in outputs] == [EmbeddingRequestOutput] * len(SENTENCES)
    assert all(o.finished and o.outputs.hidden_size == 384 for o in outputs)
    assert outputs[0].prompt_token_ids == minilm.get_tokenizer().encode(SENTENCES[0])
    got = vectors(outputs)
    assert cosines(got, minilm_reference).min() >= COSINE_BAR
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    alone = vectors(minilm.embed(SENTENCES[-1:]) + minilm.embed(SENTENCES[4:5]))
    assert cosines(alone, minilm_reference[[-1, 4]]).min() >= COSINE_BAR


@pytest.mark.timeout(60)
def test_a_batch_is_tokenized_as_each_prompt_alone(minilm) -> None:
    """`embed` tokenizes a batch's texts in one tokenizer call: each prompt, whatever its
    form, gets the ids it gets alone, and a bad prompt still names its index."""
    encode = minilm.get_tokenizer().encode
    texts = SENTENCES[:5]
    prompts = [
        texts[0],
        {"prompt": texts[1]},
        {"prompt_token_ids": encode(texts[2])},
        encode(texts[3]),
        {"prompt": "not these words", "prompt_token_ids": encode(texts[4])},
    ]
    outputs = minilm.embed(prompts)
    assert [o.prompt_token_ids for o in outputs] == [encode(t) for t in texts]
    alone = [minilm.embed(p)[0] for p in prompts]
    assert cosines(vectors(outputs), vectors(alone)).min() >= COSINE_BAR  # batched vs alone
    with pytest.raises(ValueError, match=r"prompts\[2\]: the prompt is not valid Unicode"):
        minilm.embed(["fine", {"prompt": "fine"}, "caf\udce9", {"bad": 1}])
    with pytest.raises(ValueError, match=r"prompts\[1\]: unsupported prompt keys \['bad'\]"):
        minilm.embed(["fine", {"bad": 1}, "caf\udce9"])


@pytest.mark.timeout(60)
def test_semantic_sanity(minilm) -> None:
    food, bread, horse = vectors(minilm.embed(SENTENCES[:3]))
    assert torch.dot(food, bread) > torch.dot(food, horse)


@pytest.mark.timeout(60)
def test_async_encode_yields_one_final_pooling_output(minilm, minilm_reference) -> None:
    async def main() -> list[list[PoolingRequestOutput]]:
        engine = AsyncLLM(
            EngineArgs(model=minilm.engine_args.model, distributed_executor_backend="uni")
        )
        try:

            async def one(i: int) -> list[PoolingRequestOutput]:
                return [o async for o in engine.encode(SENTENCES[i], PoolingParams(), f"r{i}")]

            return await asyncio.gather(*(one(i) for i in range(len(SENTENCES))))
        finally:
            engine.shutdown()

    streams = asyncio.run(main())
    assert all(len(s) == 1 and s[0].finished for s in streams)
    assert [s[0].request_id for s in streams] == [f"r{i}" for i in range(len(SENTENCES))]
    data = torch.stack([s[0].outputs.data for s in streams])
    assert data.dtype == torch.float32 and data.shape == (len(SENTENCES), 384)
    assert cosines(data, minilm_reference).min() >= COSINE_BAR


@pytest.mark.timeout(60)
def test_normalize_false_returns_the_raw_mean(minilm) -> None:
    raw = minilm.encode(SENTENCES[:2], PoolingParams(normalize=False))
    unit = minilm.encode(SENTENCES[:2])
    for r, u in zip(raw, unit):
        assert abs(r.outputs.data.norm().item() - 1) > 0.1
        assert torch.allclose(r.outputs.data / r.outputs.data.norm(), u.outputs.data, atol=1e-6)


@pytest.mark.timeout(60)
def test_truncate_prompt_tokens_keeps_the_last_tokens_and_the_special_ones(minilm) -> None:
    tokenizer = minilm.get_tokenizer()
    text = " ".join(SENTENCES)
    ids = tokenizer.encode(text)
    cut = minilm.embed(text, truncate_prompt_tokens=10)[0]
    assert cut.prompt_token_ids == ids[:1] + ids[-9:-1] + ids[-1:]  # [CLS] ... [SEP]
    same = minilm.embed(
        {"prompt_token_ids": cut.prompt_token_ids},
        pooling_params=PoolingParams(truncate_prompt_tokens=10),
    )[0]
    assert torch.allclose(torch.tensor(same.outputs.embedding), torch.tensor(cut.outputs.embedding))
    tokens = minilm.embed(
        {"prompt_token_ids": ids}, pooling_params=PoolingParams(truncate_prompt_tokens=5)
    )
    assert tokens[0].prompt_token_ids == ids[-5:]  # token ids are cut as given
    long_text = text * 3  # > 256 tokens: -1 cuts to max_model_len
    assert len(minilm.embed(long_text, truncate_prompt_tokens=-1)[0].prompt_token_ids) == 256


@pytest.mark.timeout(60)
def test_bad_pooling_requests_raise_value_errors_naming_the_field(minilm) -> None:
    for field, value in [("dimensions", 0), ("truncate_prompt_tokens", 0), ("normalize", "yes")]:
        with pytest.raises(ValueError, match=f"PoolingParams.{field}"):
            PoolingParams(**{field: value})
    with pytest.raises(ValueError, match="PoolingParams.dimensions.*Matryoshka"):
        minilm.embed("hi", pooling_params=PoolingParams(dimensions=128))
    with pytest.raises(
        ValueError, match="PoolingParams.truncate_prompt_tokens=300.*max_model_len=256"
    ):
        minilm.embed("hi", truncate_prompt_tokens=300)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):  # too long: says how to cut
        minilm.embed(" ".join(SENTENCES) * 3)
    with pytest.raises(ValueError, match="contradicts"):
        minilm.embed(
            "hi", truncate_prompt_tokens=4, pooling_params=PoolingParams(truncate_prompt_tokens=5)
        )
    with pytest.raises(ValueError, match="generate\\(\\) needs a generative model"):
        minilm.generate("hi")
    with pytest.raises(TypeError, match="expected PoolingParams"):
        minilm.encode("hi", SamplingParams())
    with pytest.raises(ValueError, match="pooling_task"):
        minilm.encode("hi", pooling_task="classify")
    with pytest.raises(ValueError, match="PoolingParams.dimensions"):  # one bad prompt: none sent
        minilm.embed(["fine", "bad"], pooling_params=[PoolingParams(), PoolingParams(dimensions=3)])
    assert minilm.get_stats().num_waiting == 0
    assert len(minilm.embed(["still serving"])[0].outputs.embedding) == 384


@pytest.mark.timeout(120)
def test_matryoshka_dimensions_cut_then_renormalize(embedding_model_path, tmp_path) -> None:
    import json
    from pathlib import Path

    config = json.loads((Path(embedding_model_path) / "config.json").read_text())
    path = checkpoint_variant(
        embedding_model_path,
        tmp_path / "matryoshka",
        {"config.json": {**config, "matryoshka_dimensions": [64, 128, 384]}},
    )
    llm = LLM(str(path), distributed_executor_backend="uni")
    try:
        full = llm.encode(SENTENCES[:3], PoolingParams(normalize=False))
        cut = llm.embed(SENTENCES[:3], pooling_params=PoolingParams(dimensions=64))
        for f, c in zip(full, cut):
            expected = torch.nn.functional.normalize(f.outputs.data[:64], dim=0)
            assert c.outputs.hidden_size == 64
            assert torch.allclose(torch.tensor(c.outputs.embedding), expected, atol=1e-6)
        raw = llm.encode("hi", PoolingParams(dimensions=128, normalize=False))[0]
        assert torch.allclose(
            raw.outputs.data, llm.encode("hi", PoolingParams(normalize=False))[0].outputs.data[:128]
        )
        with pytest.raises(
            ValueError, match=r"PoolingParams.dimensions must be one of .*\[64, 128, 384\]"
        ):
            llm.embed("hi", pooling_params=PoolingParams(dimensions=100))
    finally:
        llm.shutdown()


# ---- a decoder as an embedder, next to generation ---------------------------------------------


@pytest.fixture(scope="module")
def smollm_embedder(default_model_path, tmp_path_factory) -> str:
    """SmolLM2 (LlamaForCausalLM) with sentence-transformers files: last-token pooling."""
    out = tmp_path_factory.mktemp("smollm") / "smollm2-embed"
    return str(
        checkpoint_variant(default_model_path, out, sentence_transformers_files("lasttoken", 576))
    )


@pytest.mark.timeout(180)
def test_decoder_embeddings_match_sentence_transformers_while_generation_runs(
    smollm_embedder,
) -> None:
    """A generation streams; the 20 embeddings join its steps (no step of their own) and equal
    sentence-transformers' alone and batched."""
    expected = reference(smollm_embedder, SENTENCES)
    max_tokens = 48

    async def main():
        engine = AsyncLLM(EngineArgs(model=smollm_embedder, distributed_executor_backend="uni"))
        try:
            assert engine.model_config.supported_tasks == ["generate", "embed"]
            started = asyncio.Event()
            gen_params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

            async def generate(i: int) -> float:
                async for _ in engine.generate(f"Story number {i}:", gen_params):
                    started.set()
                return asyncio.get_running_loop().time()

            async def embed(i: int) -> tuple[torch.Tensor, float]:
                [out] = [o async for o in engine.encode(SENTENCES[i])]
                return out.outputs.data, asyncio.get_running_loop().time()

            steps_before = (await engine.get_stats()).num_steps
            gens = [asyncio.create_task(generate(0))]  # one: its steps are countable
            await started.wait()
            embedded = await asyncio.gather(*(embed(i) for i in range(len(SENTENCES))))
            gen_done = await asyncio.gather(*gens)
            steps = (await engine.get_stats()).num_steps - steps_before
            alone = [o async for o in engine.encode(SENTENCES[0])][0].outputs.data
            return embedded, gen_done, steps, alone
        finally:
            engine.shutdown()

    embedded, gen_done, steps, alone = asyncio.run(main())
    assert max(t for _, t in embedded) < min(gen_done)  # pooled while generation ran
    assert steps == max_tokens  # the generation's steps; the pooling requests added none
    got = torch.stack([v for v, _ in embedded])
    assert cosines(got, expected).min() >= COSINE_BAR
    assert cosines(alone, expected[0]).item() >= COSINE_BAR


@pytest.mark.timeout(60)
def test_encode_on_a_generation_only_engine_is_refused(tiny_checkpoints) -> None:
    llm = LLM(
        tiny_checkpoints["llama"],
        runner="generate",
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=2**22,
    )
    try:
        with pytest.raises(ValueError, match="runner='pooling'"):
            llm.embed("hi")
        assert llm.generate("hi", SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    finally:
        llm.shutdown()
    with pytest.raises(ValueError, match="task='generate' contradicts runner='pooling'"):
        EngineArgs(runner="pooling", task="generate")
    with pytest.raises(ValueError, match="runner must be one of"):
        EngineArgs(runner="embed")
