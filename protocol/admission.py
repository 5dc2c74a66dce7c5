"""The rules every request meets: once at the edge (the frontend raises `ValueError` at
submission) and again in engine-core (which answers a refusal), with the same words.

A request first goes through the wire schema the core decodes with (`canonical_request`):
numpy and torch integers become ints, a `SamplingParams` changed after construction is
validated again, and a float token id is refused here rather than by the core's decoder.
Then `request_error` checks it against the engine's limits.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.messages import AddRequest, Ready
from zllm.protocol.pooler_config import PoolerConfig
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

MAX_REQUEST_ID_BYTES = 256


class AdmissionLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine can take, as both sides know it."""

    max_model_len: int
    vocab_size: int
    block_size: int
    num_kv_blocks: int
    max_logprobs: int  # -1: no cap
    max_num_batched_tokens: int = 2**31  # an encoder runs each prompt in one step
    supported_tasks: list[str] = msgspec.field(default_factory=lambda: ["generate"])
    is_causal: bool = True
    hidden_size: int = 0
    pooler: PoolerConfig | None = None
    priority_scheduling: bool = False  # scheduling_policy="priority": `priority` may be set

    @classmethod
    def of(
        cls, args: EngineArgs, config: ModelConfig, num_kv_blocks: int, max_num_batched_tokens: int
    ) -> AdmissionLimits:
        return cls(
            max_model_len=config.max_model_len,
            vocab_size=config.vocab_size,
            block_size=args.block_size,
            num_kv_blocks=num_kv_blocks,
            max_logprobs=args.max_logprobs,
            max_num_batched_tokens=max_num_batched_tokens,
            supported_tasks=list(config.supported_tasks),
            is_causal=config.is_causal,
            hidden_size=config.hidden_size,
            pooler=config.pooler_config,
            priority_scheduling=args.scheduling_policy == "priority",
        )

    @classmethod
    def from_ready(cls, ready: Ready) -> AdmissionLimits:
        return cls.of(
            ready.engine_args,
            ready.model_config,
            ready.num_kv_blocks,
            ready.max_num_batched_tokens,
        )


def _to_wire(value: Any) -> Any:
    """numpy / torch integers and arrays as plain Python values (floats stay floats, so the
    typed decode refuses them where an int is due)."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if hasattr(value, "__index__"):
        return value.__index__()
    raise NotImplementedError(f"cannot send a value of type {type(value).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_to_wire)
_decoder = msgspec.msgpack.Decoder(AddRequest)


def canonical_request(
    request_id: str,
    prompt_token_ids: Any,
    params: SamplingParams | PoolingParams,
    arrival_time: float = 0.0,
    priority: int = 0,
) -> AddRequest:
    """The request exactly as engine-core will decode it, or `ValueError` naming the field."""
    if not isinstance(params, SamplingParams | PoolingParams):
        raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
    # As fields, not a new params object: its checks run once, on the decoded values.
    fields = msgspec.structs.asdict(params)
    if isinstance(fields.get("stop"), str):  # vLLM accepts `sp.stop = "..."` after construction
        fields["stop"] = [fields["stop"]]
    kind = "sampling_params" if isinstance(params, SamplingParams) else "pooling_params"
    try:
        frame = _encoder.encode(
            AddRequest(
                request_id=request_id,
                prompt_token_ids=prompt_token_ids,
                arrival_time=arrival_time,
                priority=priority,
                **{kind: fields},
            )
        )
    except (TypeError, OverflowError, NotImplementedError) as e:
        raise ValueError(f"the request cannot be encoded: {e}") from None
    try:
        return _decoder.decode(frame)
    except msgspec.ValidationError as e:
        raise ValueError(describe_validation_error(e)) from None


_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def describe_validation_error(error: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int`, got `float` - at `$.prompt_token_ids[0]`" as
    "prompt_token_ids[0]: expected `int`, got `float`"."""
    text = str(error)
    match = _PATH.search(text)
    if match is None:
        return text
    message, path = text[: match.start()], match.group(1)
    if message.startswith(("SamplingParams.", "PoolingParams.")):  # our checks name the field
        return message
    path = path.replace("sampling_params.", "SamplingParams.", 1)
    path = path.replace("pooling_params.", "PoolingParams.", 1)
    return f"{path}: {message[:1].lower()}{message[1:]}" if path else message


def request_error(add: AddRequest, limits: AdmissionLimits) -> str | None:
    """Why the engine cannot take this (canonical) request, or None."""
    size = len(add.request_id.encode("utf-8", "surrogatepass"))
    if size > MAX_REQUEST_ID_BYTES:
        return f"the request id is {size} bytes long; at most {MAX_REQUEST_ID_BYTES} are allowed"
    ids, vocab = add.prompt_token_ids, limits.vocab_size
    if not ids:
        return "the prompt is empty"
    if min(ids) < 0 or max(ids) >= vocab:  # in C: this runs for every request, twice in the core
        bad = next(i for i, t in enumerate(ids) if not 0 <= t < vocab)
        return f"prompt_token_ids[{bad}] = {ids[bad]} is outside the vocabulary [0, {vocab})"
    if add.priority != 0 and not limits.priority_scheduling:
        return (
            f"priority={add.priority} needs an engine started with "
            "scheduling_policy='priority' (this one schedules first come, first served)"
        )
    if (add.sampling_params is None) == (add.pooling_params is None):
        return "a request needs either sampling_params or pooling_params (generate or encode)"
    if add.pooling_params is not None:
        return _pooling_error(len(ids), add.pooling_params, limits)
    return _generation_error(len(ids), add.sampling_params, limits)


def _generation_error(n: int, params: SamplingParams, limits: AdmissionLimits) -> str | None:
    max_len, vocab = limits.max_model_len, limits.vocab_size
    if "generate" not in limits.supported_tasks:
        return (
            f"generate() needs a generative model; this engine serves {limits.supported_tasks} "
            "(use encode() or embed())"
        )
    if n >= max_len:
        return (
            f"the prompt has {n} tokens, but max_model_len is {max_len} (nothing left to generate)"
        )
    if params.max_tokens is not None and n + params.max_tokens > max_len:
        return (
            f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} "
            f"exceeds max_model_len={max_len}"
        )
    for name in ("logprobs", "prompt_logprobs"):
        error = _logprobs_error(name, getattr(params, name), limits)
        if error is not None:
            return error
    for name, tokens in (
        ("stop_token_ids", params.stop_token_ids or []),
        ("logit_bias", list(params.logit_bias or {})),
        ("allowed_token_ids", params.allowed_token_ids or []),
        ("bad_words", [t for words in params._bad_words_token_ids or [] for t in words]),
    ):
        bad = next((t for t in tokens if t >= vocab), None)
        if bad is not None:
            return f"SamplingParams.{name}: token id {bad} is outside the vocabulary [0, {vocab})"
    total = n + (params.max_tokens or max_len - n)
    return _blocks_error(total, limits, "lower max_tokens or give the engine more KV memory")


def _pooling_error(n: int, params: PoolingParams, limits: AdmissionLimits) -> str | None:
    if "embed" not in limits.supported_tasks or limits.pooler is None:
        return (
            f"encode()/embed() need a pooling model; this engine serves {limits.supported_tasks} "
            "(start it with runner='pooling' or runner='auto')"
        )
    if n > limits.max_model_len:
        return (
            f"the prompt has {n} tokens, more than max_model_len={limits.max_model_len} "
            "(set PoolingParams.truncate_prompt_tokens to cut it)"
        )
    if not limits.is_causal and n > limits.max_num_batched_tokens:
        return (
            f"the prompt has {n} tokens; an encoder runs each prompt in one step, and "
            f"max_num_batched_tokens={limits.max_num_batched_tokens}"
        )
    dimensions, pooler = params.dimensions, limits.pooler
    if dimensions is not None:
        if not pooler.is_matryoshka:
            return (
                "PoolingParams.dimensions: this model does not support Matryoshka "
                "representation; changing the output dimensions would give poor results"
            )
        allowed = pooler.matryoshka_dimensions
        if allowed is not None and dimensions not in allowed:
            return (
                "PoolingParams.dimensions must be one of the model's Matryoshka dimensions "
                f"{allowed}, got {dimensions}"
            )
        if dimensions > limits.hidden_size:
            return (
                f"PoolingParams.dimensions must be <= the model's hidden size "
                f"{limits.hidden_size}, got {dimensions}"
            )
    return _blocks_error(n, limits, "give the engine more KV memory")


def _blocks_error(tokens: int, limits: AdmissionLimits, fix: str) -> str | None:
    needed = -(-tokens // limits.block_size)
    if needed > limits.num_kv_blocks:
        return (
            f"the request needs {needed} KV blocks ({tokens} tokens) but the engine's whole KV "
            f"cache has {limits.num_kv_blocks}; {fix}"
        )
    return None


def _logprobs_error(name: str, k: int | None, limits: AdmissionLimits) -> str | None:
    if k is None or limits.max_logprobs == -1:
        return None
    asked = limits.vocab_size if k == -1 else k
    if asked <= limits.max_logprobs:
        return None
    what = f"-1 (the whole vocabulary, {limits.vocab_size})" if k == -1 else str(k)
    return (
        f"SamplingParams.{name}={what} is more than max_logprobs={limits.max_logprobs}; "
        "ask for fewer, or start the engine with a larger max_logprobs"
    )
