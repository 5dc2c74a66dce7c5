"""Request bodies as msgspec Structs: OpenAI's fields with vLLM's extras. An unknown or
mistyped field is a 400 naming it (`errors.decode_json`); values are checked where they
become `SamplingParams` / `PoolingParams` (`params.py`)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from zllm.protocol.sampling_params import SamplingParams

_REQUEST = dict(kw_only=True, forbid_unknown_fields=True)


class StreamOptions(msgspec.Struct, **_REQUEST):
    include_usage: bool = False  # a last chunk with the usage and no choices
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


class SamplingFields(msgspec.Struct, **_REQUEST):
    """What /v1/completions and /v1/chat/completions share: OpenAI's sampling fields, then
    vLLM's extra ones. None means the model's default (its generation_config), as in vLLM."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the caller's end user: in the debug log of each request
    # ---- vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    priority: int = 0  # lower first, when the server runs --scheduling-policy priority


class CompletionRequest(SamplingFields, **_REQUEST):
    prompt: str | list[Any]  # a string, strings, token ids, or lists of token ids
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None  # refused: no fill-in-the-middle
    best_of: int | None = None  # only = n (vLLM v1 has no best_of either)
    add_special_tokens: bool = True


class ChatMessage(msgspec.Struct, **_REQUEST):
    role: str
    content: str | list[dict[str, Any]] | None = None  # a string or text parts
    name: str | None = None


class ChatCompletionRequest(SamplingFields, **_REQUEST):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class EmbeddingRequest(msgspec.Struct, **_REQUEST):
    input: str | list[Any]  # a string, strings, token ids, or lists of token ids
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    normalize: bool | None = None  # vLLM's: None is the checkpoint's choice
    priority: int = 0


class PoolingRequest(EmbeddingRequest, **_REQUEST):
    """vLLM's /pooling: the model's pooled output for each input, as is."""


class TokenizeRequest(msgspec.Struct, **_REQUEST):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # tokenized through the chat template
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, **_REQUEST):
    tokens: list[int]
    model: str | None = None


# ---- the native /generate and /ws/generate: every SamplingParams field at the top level -----

_NATIVE_EXCLUDED = {"output_kind", "extra_args"}  # the server streams DELTA; no plugins
NATIVE_SAMPLING_FIELDS = [
    f
    for f in msgspec.structs.fields(SamplingParams)
    if not f.name.startswith("_") and f.name not in _NATIVE_EXCLUDED
]
_NATIVE_FIELDS = [
    ("prompt", str | list[int]),
    ("stream", bool, False),
    ("priority", int, 0),
    ("model", str | None, None),
    *((f.name, f.type, f.default) for f in NATIVE_SAMPLING_FIELDS),
]

GenerateRequest = msgspec.defstruct("GenerateRequest", _NATIVE_FIELDS, **_REQUEST)

# /ws/generate messages, told apart by "type"
WsGenerate = msgspec.defstruct(
    "WsGenerate",
    [("request_id", str), *_NATIVE_FIELDS],
    tag="generate",
    tag_field="type",
    **_REQUEST,
)


class WsCancel(msgspec.Struct, tag="cancel", tag_field="type", **_REQUEST):
    request_id: str


WsMessage = WsGenerate | WsCancel
