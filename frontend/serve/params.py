"""Request bodies as engine inputs: `SamplingParams` (with the model's defaults, as vLLM's
server applies its generation_config), `PoolingParams`, and the prompt forms OpenAI allows.
Every refusal is a 400 naming the field."""

from __future__ import annotations

from typing import Any

from zllm.frontend.serve.errors import APIError, bad_request
from zllm.frontend.serve.request_schemas import (
    NATIVE_SAMPLING_FIELDS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    SamplingFields,
)
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on chat top_logprobs

Prompt = str | dict[str, Any]  # text, or {"prompt_token_ids": [...]}


def _build(kind: type, fields: dict[str, Any]) -> Any:
    try:
        return kind.from_optional(**fields) if kind is SamplingParams else kind(**fields)
    except (ValueError, NotImplementedError) as e:
        raise bad_request(str(e)) from None


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise bad_request(
            "logit_bias: keys must be token ids (integers as strings)", "logit_bias"
        ) from None


def _common(body: SamplingFields, defaults: dict[str, Any]) -> dict[str, Any]:
    """The fields both OpenAI routes share, None where the body left the model's default."""
    if body.n < 1:
        raise bad_request(f"n must be >= 1, got {body.n}", "n")
    given = {
        "n": body.n,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "stop_token_ids": body.stop_token_ids,
        "logit_bias": _logit_bias(body.logit_bias),
        "min_tokens": body.min_tokens,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "spaces_between_special_tokens": body.spaces_between_special_tokens,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "bad_words": body.bad_words,
        "allowed_token_ids": body.allowed_token_ids,
        "truncate_prompt_tokens": body.truncate_prompt_tokens,
        "prompt_logprobs": body.prompt_logprobs,
        "output_kind": RequestOutputKind.DELTA,  # the server streams, or gathers the deltas
    }
    for name, value in defaults.items():  # the model's generation_config, where not given
        if given.get(name) is None:
            given[name] = value
    return given


def completion_params(body: CompletionRequest, defaults: dict[str, Any]) -> SamplingParams:
    if body.suffix is not None:
        raise APIError(
            400, "suffix is not supported by zllm (no fill-in-the-middle)", param="suffix"
        )
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(
            400,
            f"best_of={body.best_of} is not supported by zllm (only best_of = n)",
            param="best_of",
        )
    if body.max_tokens is not None and body.max_tokens < 1:
        raise bad_request(f"max_tokens must be >= 1, got {body.max_tokens}", "max_tokens")
    fields = _common(body, defaults)
    fields["max_tokens"] = body.max_tokens
    fields["logprobs"] = body.logprobs
    if body.echo and body.logprobs is not None and body.prompt_logprobs is None:
        fields["prompt_logprobs"] = body.logprobs  # echoed prompt tokens carry logprobs too
    return _build(SamplingParams, fields)


def chat_params(body: ChatCompletionRequest, defaults: dict[str, Any]) -> SamplingParams:
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{name} must be >= 1, got {max_tokens}", name)
    top = body.top_logprobs
    if top is not None:
        if not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs"
            )
    fields = _common(body, defaults)
    fields["max_tokens"] = max_tokens
    fields["logprobs"] = (top or 0) if body.logprobs else None
    return _build(SamplingParams, fields)


def native_params(body: Any) -> SamplingParams:
    """/generate and /ws/generate: every SamplingParams field as given (defaults: its own)."""
    fields = {f.name: getattr(body, f.name) for f in NATIVE_SAMPLING_FIELDS}
    fields["output_kind"] = RequestOutputKind.DELTA
    return _build(SamplingParams, fields)


def pooling_params(body: EmbeddingRequest) -> PoolingParams:
    return _build(
        PoolingParams,
        {
            "dimensions": body.dimensions,
            "normalize": body.normalize,
            "truncate_prompt_tokens": body.truncate_prompt_tokens,
        },
    )


# ---- prompts ---------------------------------------------------------------------------------


def _token_ids(value: list[Any], field: str) -> dict[str, Any]:
    if not value:
        raise bad_request(f"{field} is empty", field)
    for i, token in enumerate(value):
        if not isinstance(token, int) or isinstance(token, bool):
            raise bad_request(
                f"{field}[{i}]: expected a token id (int), got {type(token).__name__}",
                f"{field}[{i}]",
            )
    return {"prompt_token_ids": value}


def prompt_list(value: str | list[Any], field: str) -> list[Prompt]:
    """OpenAI's prompt forms (a string, strings, token ids, lists of token ids) as prompts."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise bad_request(f"{field} is empty", field)
    if all(isinstance(item, str) for item in value):
        return list(value)
    if all(isinstance(item, list) for item in value):
        return [_token_ids(item, f"{field}[{i}]") for i, item in enumerate(value)]
    if isinstance(value[0], int):
        return [_token_ids(value, field)]
    raise bad_request(
        f"{field} must be a string, a list of strings, a list of token ids or a list of lists of "
        "token ids",
        field,
    )


def chat_messages(messages: list[ChatMessage], field: str = "messages") -> list[dict[str, Any]]:
    """Messages as the chat template takes them; content parts must be text."""
    if not messages:
        raise bad_request(f"{field} is empty", field)
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                where = f"{field}[{i}].content[{j}]"
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(
                        f'{where}: only text parts ({{"type": "text", "text": ...}}) are '
                        f"supported, got type {part.get('type')!r}",
                        where,
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        out.append(entry)
    return out
