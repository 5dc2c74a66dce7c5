"""`POST /v1/embeddings` (OpenAI's shape) and `POST /pooling` (vLLM's: the pooled output as
is): inputs as a string, strings, token ids or lists of them; vectors as floats or base64
(little-endian float32, what the `openai` client decodes)."""

from __future__ import annotations

import base64

from aiohttp import web

from zllm.frontend.serve.body import json_response, read_request
from zllm.frontend.serve.params import pooling_params, prompt_list
from zllm.frontend.serve.request_schemas import EmbeddingRequest, PoolingRequest
from zllm.frontend.serve.response_schemas import (
    EmbeddingData,
    EmbeddingResponse,
    EmbeddingUsage,
    PoolingData,
    PoolingResponse,
    new_id,
    now_s,
)
from zllm.frontend.serve.streaming import gather_all


def encode_vector(data, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(data.numpy().astype("<f4").tobytes()).decode("ascii")
    return data.tolist()


async def _pool(request: web.Request, body_type: type):
    state, body, model = await read_request(request, body_type, "embed")
    params = pooling_params(body)
    prompts = prompt_list(body.input, "input")
    outputs = await gather_all([state.encode(p, params, body.priority) for p in prompts])
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    vectors = [encode_vector(o.outputs.data, body.encoding_format) for o in outputs]
    head = dict(
        id=new_id("embd"),
        created=now_s(),
        model=model,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
    return vectors, head


async def create_embedding(request: web.Request) -> web.Response:
    vectors, head = await _pool(request, EmbeddingRequest)
    data = [EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)]
    return json_response(EmbeddingResponse(data=data, **head))


async def create_pooling(request: web.Request) -> web.Response:
    vectors, head = await _pool(request, PoolingRequest)
    data = [PoolingData(index=i, data=v) for i, v in enumerate(vectors)]
    return json_response(PoolingResponse(data=data, **head))
