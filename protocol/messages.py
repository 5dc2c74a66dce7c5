"""Messages between frontends and engine-core: msgspec Structs, tagged, versioned.

Every frame on a frontend<->core socket is one of these, encoded with msgpack.
Receivers decode with a typed decoder (`decode_client_message` / `decode_core_message`):
a frame that does not decode raises `msgspec.ValidationError`/`DecodeError`, which the
receiver logs and drops. No pickle crosses these sockets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Union

import msgspec

from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

PROTOCOL_VERSION = 2

_STRUCT = dict(tag=True, kw_only=True, omit_defaults=True, array_like=False)


# ---- frontend -> engine-core (input socket) -------------------------------------------


class Hello(msgspec.Struct, **_STRUCT):
    """First frame a client sends, on its output socket, so the core can route to it."""

    protocol_version: int
    client_name: str = ""


class AddRequest(msgspec.Struct, **_STRUCT):
    """A generation request (`sampling_params`) or a pooling request (`pooling_params`)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None = None
    arrival_time: float = 0.0
    pooling_params: PoolingParams | None = None


class AddRequests(msgspec.Struct, **_STRUCT):
    """Several requests in one frame, so the engine admits them in the same step: an offline
    batch then always meets the same batch composition (and gets the same tokens)."""

    requests: list[AddRequest]


class AbortRequests(msgspec.Struct, **_STRUCT):
    request_ids: list[str]


class UtilityCall(msgspec.Struct, **_STRUCT):
    """A call like `reset_prefix_cache`, `sleep`, `is_sleeping`; answered by `UtilityReply`."""

    call_id: int
    method: str
    args: list[Any] = []


class Goodbye(msgspec.Struct, **_STRUCT):
    """The client is leaving: abort whatever it still has running."""


ClientMessage = Union[Hello, AddRequest, AddRequests, AbortRequests, UtilityCall, Goodbye]


# ---- engine-core -> frontend (output socket) ------------------------------------------


class Ready(msgspec.Struct, **_STRUCT):
    """Handshake answer: the engine is up and this is what it serves."""

    protocol_version: int
    engine_args: EngineArgs
    model_config: ModelConfig
    num_kv_blocks: int
    max_num_batched_tokens: int
    core_pid: int


class StartupFailed(msgspec.Struct, **_STRUCT):
    """The engine could not start; `error` is the root cause as the failing process saw it."""

    error: str


class Logprobs(msgspec.Struct, kw_only=True, array_like=True):
    """Top-k logprobs for a run of positions: ids[i][j], logprobs[i][j], ranks[i] of the chosen token."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class RequestUpdate(msgspec.Struct, kw_only=True, omit_defaults=True, array_like=True):
    """What happened to one request in one step."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    new_logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    pooled: bytes | None = None  # a pooling request's vector: float32, little-endian


class SchedulerStats(msgspec.Struct, kw_only=True, array_like=True):
    """Engine state after a step, for metrics and tests."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0  # cumulative, in tokens
    prefix_cache_hits: int = 0  # cumulative, in tokens
    num_preemptions: int = 0  # cumulative
    num_scheduled_tokens: int = 0  # this step
    num_prefill_tokens: int = 0  # cumulative tokens run through the model for prompts
    num_steps: int = 0  # cumulative


class StepOutputs(msgspec.Struct, **_STRUCT):
    updates: list[RequestUpdate]
    stats: SchedulerStats | None = None
    timestamp: float = 0.0


class UtilityReply(msgspec.Struct, **_STRUCT):
    call_id: int
    result: Any = None
    error: str | None = None


class EngineDead(msgspec.Struct, **_STRUCT):
    """The engine is going down for good; every waiting request fails with `error`."""

    error: str


CoreMessage = Union[Ready, StartupFailed, StepOutputs, UtilityReply, EngineDead]


_local = threading.local()  # msgspec encoders keep a buffer: one per thread


def _codec(name: str, factory: Callable[[], Any]) -> Any:
    codec = getattr(_local, name, None)
    if codec is None:
        codec = factory()
        setattr(_local, name, codec)
    return codec


def encode(message: msgspec.Struct) -> bytes:
    return _codec("encoder", msgspec.msgpack.Encoder).encode(message)


def decode_client_message(frame: bytes) -> ClientMessage:
    return _codec("client", lambda: msgspec.msgpack.Decoder(ClientMessage)).decode(frame)


def decode_core_message(frame: bytes) -> CoreMessage:
    return _codec("core", lambda: msgspec.msgpack.Decoder(CoreMessage)).decode(frame)
