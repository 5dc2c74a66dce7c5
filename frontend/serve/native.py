"""The native routes: `POST /generate` (JSON, or NDJSON when streamed), `GET /health`,
`/ping`, `/version`, `/models` and `/v1/models`, `POST /tokenize`, `/detokenize`, and
`GET /metrics`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from zllm.frontend.outputs import CompletionOutput, Logprob, RequestOutput
from zllm.frontend.serve.body import json_response, read_json, read_request
from zllm.frontend.serve.chat import chat_prompt_of
from zllm.frontend.serve.errors import APIError, bad_request, engine_dead
from zllm.frontend.serve.gather import Choice, gather
from zllm.frontend.serve.metrics import CONTENT_TYPE
from zllm.frontend.serve.params import native_params
from zllm.frontend.serve.request_schemas import (
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
)
from zllm.frontend.serve.response_schemas import ModelCard, ModelList, UsageInfo
from zllm.frontend.serve.state import STATE, ModelState, ServerState
from zllm.frontend.serve.streaming import merge, ndjson_response

HEALTH_TIMEOUT_S = 5.0


def positions_json(positions: list[dict[int, Logprob] | None] | None) -> list | None:
    """Logprobs as JSON: per position, the chosen token first, then the top ones."""
    if positions is None:
        return None
    return [
        None
        if position is None
        else [
            {"token_id": t, "token": lp.decoded_token, "logprob": lp.logprob, "rank": lp.rank}
            for t, lp in position.items()
        ]
        for position in positions
    ]


def output_json(index: int, c: CompletionOutput | Choice) -> dict[str, Any]:
    return {
        "index": index,
        "text": c.text,
        "token_ids": c.token_ids,
        "logprobs": positions_json(c.logprobs),
        "cumulative_logprob": c.cumulative_logprob,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


def prompt_of(body: Any) -> Any:
    if isinstance(body.prompt, list):
        if not body.prompt:
            raise bad_request("prompt is empty", "prompt")
        return {"prompt_token_ids": body.prompt}
    return body.prompt


async def generate(request: web.Request) -> web.StreamResponse:
    """One prompt (text or token ids) and any `SamplingParams` field at the top level."""
    state, body, _ = await read_request(request, GenerateRequest, "generate")
    params = native_params(body)
    outputs = merge([state.generate(prompt_of(body), params, body.priority)])
    if body.stream:
        return await ndjson_response(request, _lines(outputs))
    (result,) = await gather(outputs, 1, params.n)
    completion_tokens = sum(len(c.token_ids) for c in result.choices)
    return json_response(
        {
            "prompt": result.prompt,
            "prompt_token_ids": result.prompt_token_ids,
            "prompt_logprobs": positions_json(result.prompt_logprobs),
            "outputs": [output_json(i, c) for i, c in enumerate(result.choices)],
            "usage": UsageInfo.of(len(result.prompt_token_ids), completion_tokens),
        }
    )


async def _lines(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[dict]:
    async with contextlib.aclosing(outputs):  # leaving early aborts the request now
        completion_tokens = 0
        async for _, output in outputs:
            completion_tokens += sum(len(c.token_ids) for c in output.outputs)
            line: dict[str, Any] = {
                "outputs": [output_json(c.index, c) for c in output.outputs],
                "finished": output.finished,
            }
            if output.prompt_logprobs is not None:
                line["prompt_logprobs"] = positions_json(output.prompt_logprobs)
            if output.finished:
                line["usage"] = UsageInfo.of(len(output.prompt_token_ids), completion_tokens)
            yield line


async def health(request: web.Request) -> web.Response:
    """Per served model: its live and dead replicas. 200 while every model (or the one named
    by `?model=`) has a live replica whose engine-core and workers answer, else 503."""
    state = request.app[STATE]
    asked = request.query.get("model")
    names = state.served_names if asked is None else [state.check_model(asked).model_name]
    report = state.router.health()
    for name in names:
        served = state.models[name].served
        try:
            await asyncio.wait_for(state.router.check_health(served.name), HEALTH_TIMEOUT_S)
        except Exception as e:
            raise engine_dead(
                f"model {name!r} did not pass its health check: {e}"
                if len(names) > 1
                else f"the engine did not pass its health check: {e}"
            ) from None
    return json_response(
        {"models": {name: report[state.models[name].served.name] for name in names}}
    )


async def version(request: web.Request) -> web.Response:
    from zllm import __version__

    return json_response({"version": __version__})


def model_list(state: ServerState) -> ModelList:
    return ModelList(
        data=[
            ModelCard(
                id=name, created=state.created, root=model.root, max_model_len=model.max_model_len
            )
            for name, model in state.models.items()
        ]
    )


async def models(request: web.Request) -> web.Response:
    return json_response(model_list(request.app[STATE]))


def _tokenizer(state: ModelState):
    if state.tokenizer is None:
        raise APIError(400, "this server has no tokenizer (--skip-tokenizer-init)")
    return state.tokenizer


async def tokenize(request: web.Request) -> web.Response:
    """`prompt` (text) or `messages` (through the chat template) as token ids."""
    body: TokenizeRequest = await read_json(request, TokenizeRequest)
    state = await request.app[STATE].wait_model(body.model)
    tokenizer = _tokenizer(state)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give either prompt or messages", "prompt")
    if body.messages is not None:
        tokens = chat_prompt_of(state, body.messages, body.add_generation_prompt)[
            "prompt_token_ids"
        ]
    else:
        tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return json_response(
        {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}
    )


async def detokenize(request: web.Request) -> web.Response:
    body: DetokenizeRequest = await read_json(request, DetokenizeRequest)
    state = await request.app[STATE].wait_model(body.model)
    tokenizer = _tokenizer(state)
    vocab = state.engine.model_config.get_vocab_size()
    bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(
            f"tokens[{bad}] = {body.tokens[bad]} is outside the vocabulary [0, {vocab})",
            f"tokens[{bad}]",
        )
    return json_response({"prompt": tokenizer.decode(body.tokens)})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    stats = None
    first = state.models[state.model_name].served if state.models else None
    if first is not None and first.live():
        try:  # the first model's first live replica (engine gauges carry one model_name)
            stats = await asyncio.wait_for(first.engine.get_stats(), HEALTH_TIMEOUT_S)
        except Exception:  # a dead engine still has the server's own metrics to show
            stats = None
    return web.Response(body=state.metrics.render(stats), headers={"Content-Type": CONTENT_TYPE})
