"""`/v1/embeddings` and `/pooling` in `zllm serve` on the default embedding model
(all-MiniLM-L6-v2), through the official `openai` client: every input form, float and base64
(the same vector), `dimensions` refused for a non-Matryoshka model, usage."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import numpy as np
import openai
import pytest
from scripts.serve_process import running_server

NAME = "all-minilm-l6-v2"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
]

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(embedding_model_path):
    with running_server(
        NAME, "--runner", "pooling", "--distributed-executor-backend", "uni"
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_embeddings_create_float_and_base64_agree(client):
    floats = client.embeddings.create(model=NAME, input=SENTENCES, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == NAME
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # the model normalizes
    # The openai client asks for base64 unless told otherwise, and decodes it itself.
    decoded = client.embeddings.create(model=NAME, input=SENTENCES)
    assert np.array_equal(np.array([d.embedding for d in decoded.data]), vectors)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(SENTENCES)
    eating, bread, horse = vectors
    assert eating @ bread > eating @ horse


def test_base64_is_little_endian_float32_of_the_same_vector(server):
    async def post(body):
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/embeddings", json=body) as r:
                return r.status, await r.json()

    _, floats = asyncio.run(post({"input": SENTENCES[0]}))
    _, encoded = asyncio.run(post({"input": SENTENCES[0], "encoding_format": "base64"}))
    raw = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    assert raw.tolist() == np.float32(floats["data"][0]["embedding"]).tolist()


def test_token_id_inputs_and_single_strings(client, server):
    async def tokenize(text: str) -> list[int]:
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/tokenize", json={"prompt": text}) as r:
                return (await r.json())["tokens"]

    text = client.embeddings.create(model=NAME, input=SENTENCES[2], encoding_format="float")
    ids = asyncio.run(tokenize(SENTENCES[2]))  # [CLS] ... [SEP]
    by_ids = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    both = client.embeddings.create(model=NAME, input=[ids, ids[:5]], encoding_format="float")
    assert np.allclose(by_ids.data[0].embedding, text.data[0].embedding, atol=1e-6)
    assert np.allclose(both.data[0].embedding, text.data[0].embedding, atol=1e-6)
    assert by_ids.usage.prompt_tokens == len(ids) and both.usage.prompt_tokens == len(ids) + 5


def test_errors_name_the_field(client, server):
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=NAME, input="x", dimensions=64)
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model=NAME, input=[])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError, match="generate"):  # an encoder cannot complete
        client.completions.create(model=NAME, prompt="x")


def test_pooling_returns_the_raw_pooled_output(server, client):
    async def post(body):
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/pooling", json=body) as r:
                return r.status, await r.json()

    status, pooled = asyncio.run(post({"input": SENTENCES[:2], "normalize": False}))
    assert status == 200 and pooled["object"] == "list"
    assert [d["object"] for d in pooled["data"]] == ["pooling", "pooling"]
    raw = np.array(pooled["data"][0]["data"])
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3  # not normalized, as asked
    embedded = client.embeddings.create(model=NAME, input=SENTENCES[0], encoding_format="float")
    assert np.allclose(raw / np.linalg.norm(raw), embedded.data[0].embedding, atol=1e-5)
