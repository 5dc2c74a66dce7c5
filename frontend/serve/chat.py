"""`POST /v1/chat/completions`: the tokenizer's chat template over system/user/assistant
messages, `n`, `logprobs`/`top_logprobs`, `stream` (the first chunk of each choice carries the
role, the last its finish reason; `include_usage` adds a usage chunk with no choices)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from zllm.frontend.serve.body import json_response, read_request
from zllm.frontend.serve.errors import bad_request
from zllm.frontend.serve.gather import gather
from zllm.frontend.serve.logprobs import chat_logprobs
from zllm.frontend.serve.params import chat_messages, chat_params
from zllm.frontend.serve.request_schemas import ChatCompletionRequest, ChatMessage
from zllm.frontend.serve.response_schemas import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
    new_id,
    now_s,
)
from zllm.frontend.serve.state import ModelState
from zllm.frontend.serve.streaming import merge, sse_response

ROLE = "assistant"


def chat_prompt(state: ModelState, body: ChatCompletionRequest) -> dict:
    """The request's conversation through the chat template, with its options."""
    if body.add_generation_prompt and body.continue_final_message:
        raise bad_request(
            "continue_final_message=true continues the last message: it needs "
            "add_generation_prompt=false",
            "continue_final_message",
        )
    options = {
        "chat_template": body.chat_template,
        "continue_final_message": body.continue_final_message,
        **(body.chat_template_kwargs or {}),
    }
    return chat_prompt_of(state, body.messages, body.add_generation_prompt, **options)


def chat_prompt_of(
    state: ModelState, messages: list[ChatMessage], add_generation_prompt: bool, **options: Any
) -> dict:
    """Messages through the chat template, as text and token ids (a 400 if the template
    refuses them, e.g. roles that do not alternate)."""
    conversation = chat_messages(messages)
    try:
        return state.engine.processor.chat_prompt(conversation, add_generation_prompt, **options)
    except ValueError:
        raise
    except Exception as e:  # jinja2's TemplateError and the like: the conversation's fault
        raise bad_request(f"messages: the chat template refused them: {e}", "messages") from None


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    state, body, model = await read_request(request, ChatCompletionRequest, "generate")
    params = chat_params(body, state.defaults)
    prompt = chat_prompt(state, body)
    outputs = merge([state.generate(prompt, params, body.priority)])
    head = dict(id=new_id("chatcmpl"), created=now_s(), model=model)
    top = body.top_logprobs or 0
    if body.stream:
        return await sse_response(request, _chunks(state, body, head, outputs))
    (result,) = await gather(outputs, 1, body.n)
    choices = [
        ChatChoice(
            index=i,
            message=ChatMessageOut(role=ROLE, content=choice.text),
            logprobs=chat_logprobs(choice.token_ids, choice.logprobs or [], top, state.tokenizer)
            if body.logprobs
            else None,
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
        )
        for i, choice in enumerate(result.choices)
    ]
    usage = UsageInfo.of(
        len(result.prompt_token_ids), sum(len(c.token_ids) for c in result.choices)
    )
    return json_response(ChatCompletionResponse(choices=choices, usage=usage, **head))


async def _chunks(
    state: ModelState, body: ChatCompletionRequest, head: dict, outputs
) -> AsyncIterator[ChatCompletionChunk]:
    async with contextlib.aclosing(outputs):  # leaving early aborts the request now
        options = body.stream_options
        continuous = options is not None and options.continuous_usage_stats
        top = body.top_logprobs or 0
        prompt_tokens = completion_tokens = 0
        started = False
        async for _, output in outputs:
            prompt_tokens = len(output.prompt_token_ids)
            usage = UsageInfo.of(prompt_tokens, completion_tokens) if continuous else None
            if not started:  # the first engine output exists: the request was accepted
                started = True
                for i in range(body.n):
                    yield ChatCompletionChunk(
                        choices=[
                            ChatStreamChoice(index=i, delta=DeltaMessage(role=ROLE, content=""))
                        ],
                        usage=usage,
                        **head,
                    )
            for completion in output.outputs:
                completion_tokens += len(completion.token_ids)
                logprobs = None
                if body.logprobs:
                    logprobs = chat_logprobs(
                        completion.token_ids, completion.logprobs or [], top, state.tokenizer
                    )
                yield ChatCompletionChunk(
                    choices=[
                        ChatStreamChoice(
                            index=completion.index,
                            delta=DeltaMessage(content=completion.text),
                            logprobs=logprobs,
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason,
                        )
                    ],
                    usage=UsageInfo.of(prompt_tokens, completion_tokens) if continuous else None,
                    **head,
                )
        if options is not None and options.include_usage:
            yield ChatCompletionChunk(
                choices=[], usage=UsageInfo.of(prompt_tokens, completion_tokens), **head
            )
