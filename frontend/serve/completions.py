"""`POST /v1/completions`: prompts (a string, strings, token ids, lists of them), `n`, `echo`,
`logprobs`, `stream` with `stream_options`; choice i of prompt p has index p * n + i."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from zllm.frontend.serve.body import json_response, read_request
from zllm.frontend.serve.gather import gather, prompt_text
from zllm.frontend.serve.logprobs import completion_logprobs
from zllm.frontend.serve.params import completion_params, prompt_list
from zllm.frontend.serve.request_schemas import CompletionRequest
from zllm.frontend.serve.response_schemas import (
    CompletionChoice,
    CompletionResponse,
    UsageInfo,
    new_id,
    now_s,
)
from zllm.frontend.serve.state import ModelState
from zllm.frontend.serve.streaming import merge, sse_response


async def create_completion(request: web.Request) -> web.StreamResponse:
    state, body, model = await read_request(request, CompletionRequest, "generate")
    params = completion_params(body, state.defaults)
    prompts = prompt_list(body.prompt, "prompt")
    outputs = merge([state.generate(p, params, body.priority) for p in prompts])
    head = dict(id=new_id("cmpl"), created=now_s(), model=model)
    if body.stream:
        return await sse_response(request, _chunks(state, body, head, outputs))
    results = await gather(outputs, len(prompts), body.n)
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p, result in enumerate(results):
        prompt_tokens += len(result.prompt_token_ids)
        echo = prompt_text(result.prompt, result.prompt_token_ids, state.tokenizer)
        for i, choice in enumerate(result.choices):
            completion_tokens += len(choice.token_ids)
            token_ids, positions = choice.token_ids, choice.logprobs
            if body.echo and body.logprobs is not None:
                token_ids = result.prompt_token_ids + token_ids
                positions = (result.prompt_logprobs or []) + (positions or [])
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(token_ids, positions, body.logprobs, state.tokenizer)
            choices.append(
                CompletionChoice(
                    index=p * body.n + i,
                    text=(echo if body.echo else "") + choice.text,
                    logprobs=logprobs,
                    finish_reason=choice.finish_reason,
                    stop_reason=choice.stop_reason,
                )
            )
    usage = UsageInfo.of(prompt_tokens, completion_tokens)
    return json_response(CompletionResponse(choices=choices, usage=usage, **head))


async def _chunks(state: ModelState, body: CompletionRequest, head: dict, outputs) -> AsyncIterator:
    async with contextlib.aclosing(outputs):  # leaving early aborts the request now
        n = body.n
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        offsets: dict[int, int] = {}  # choice index -> text offset so far (logprobs)
        options = body.stream_options
        continuous = options is not None and options.continuous_usage_stats
        async for p, output in outputs:
            prompt_tokens.setdefault(p, len(output.prompt_token_ids))
            for completion in output.outputs:
                index = p * n + completion.index
                text, token_ids, positions = (
                    completion.text,
                    completion.token_ids,
                    completion.logprobs,
                )
                first = index not in offsets
                if first and body.echo:
                    text = (
                        prompt_text(output.prompt, output.prompt_token_ids, state.tokenizer) + text
                    )
                    if body.logprobs is not None:
                        token_ids = output.prompt_token_ids + token_ids
                        positions = (output.prompt_logprobs or []) + (positions or [])
                completion_tokens += len(completion.token_ids)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(
                        token_ids,
                        positions or [],
                        body.logprobs,
                        state.tokenizer,
                        offsets.get(index, 0),
                    )
                offsets[index] = offsets.get(index, 0) + len(text)
                usage = (
                    UsageInfo.of(sum(prompt_tokens.values()), completion_tokens)
                    if continuous
                    else None
                )
                yield CompletionResponse(
                    choices=[
                        CompletionChoice(
                            index=index,
                            text=text,
                            logprobs=logprobs,
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason,
                        )
                    ],
                    usage=usage,
                    **head,
                )
        if options is not None and options.include_usage:
            yield CompletionResponse(
                choices=[],
                usage=UsageInfo.of(sum(prompt_tokens.values()), completion_tokens),
                **head,
            )
