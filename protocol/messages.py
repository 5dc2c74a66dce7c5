"""Messages between frontends and engine-core: msgspec Structs, tagged, versioned.

Every frame on a frontend<->core socket is one of these, encoded with msgpack.
Receivers decode with a typed decoder (`decode_client_message` / `decode_core_message`):
a frame that does not decode raises `msgspec.ValidationError`/`DecodeError`; engine-core
answers it (`core/client_frames.py`), a client logs it. No pickle crosses these sockets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Union

import msgspec

from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

PROTOCOL_VERSION = 4  # 4: AddRequest.priority, RequestUpdate.queue_time

# The largest frame engine-core reads; larger ones are refused unread (and ZeroMQ drops a
# connection that sends more than twice this). Clients split their batches below it.
MAX_FRAME_BYTES = 64 * 2**20

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
    priority: int = 0  # lower first, under scheduling_policy="priority"


class AddRequests(msgspec.Struct, **_STRUCT):
    """Several requests in one frame, so the engine admits them in the same step: an offline
    batch then always meets the same batch composition (and gets the same tokens)."""

    requests: list[AddRequest]


class EncodedAddRequests(msgspec.Struct, tag="AddRequests", kw_only=True):
    """`AddRequests` as a client sends it: each request encoded already, by the thread that
    submitted it (it decodes as `AddRequests`)."""

    requests: list[msgspec.Raw]


class AbortRequests(msgspec.Struct, **_STRUCT):
    request_ids: list[str]


class UtilityCall(msgspec.Struct, **_STRUCT):
    """A call like `reset_prefix_cache`, `sleep`, `is_sleeping`; answered by `UtilityReply`."""

    call_id: int
    method: str
    args: list[Any] = []


class Goodbye(msgspec.Struct, **_STRUCT):
    """The client is leaving: abort whatever it still has running."""


class Heartbeat(msgspec.Struct, **_STRUCT):
    """The client is alive (sent when it has sent nothing else for a while: see
    `Ready.client_timeout_s`)."""


ClientMessage = Union[
    Hello, AddRequest, AddRequests, AbortRequests, UtilityCall, Goodbye, Heartbeat
]


# ---- engine-core -> frontend (output socket) ------------------------------------------


class Ready(msgspec.Struct, **_STRUCT):
    """Handshake answer: the engine is up and this is what it serves."""

    protocol_version: int
    engine_args: EngineArgs
    model_config: ModelConfig
    num_kv_blocks: int
    max_num_batched_tokens: int
    core_pid: int
    # A daemon forgets a client silent for this long (None: never): send at least a
    # `Heartbeat` every quarter of it.
    client_timeout_s: float | None = None
    # sha256 of the tokenizer and config files (`protocol/model_files.py`); a client without
    # the daemon's filesystem fetches them with the utility call "get_model_files".
    model_files_digest: str = ""
    max_frame_bytes: int = MAX_FRAME_BYTES


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
    error: str | None = None  # the request failed: refused, or aborted by a shutdown
    # with `error`: "invalid" (the request), "overloaded" (retry), "shutdown" (engine-core is
    # stopping: not admitted, or not finished within its drain time)
    error_kind: str | None = None
    pooled: bytes | None = None  # a pooling request's vector: float32, little-endian
    queue_time: float | None = None  # seconds from arrival in the engine to first scheduled (once)

    @classmethod
    def refused(cls, request_id: str, error: str, kind: str = "invalid") -> RequestUpdate:
        """The request will not run: `kind` "invalid" (its fault) or "overloaded" (retry later)."""
        return cls(
            request_id=request_id,
            new_token_ids=[],
            finish_reason="error",
            error=error,
            error_kind=kind,
        )


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
    num_rejected_frames: int = 0  # cumulative: client frames that did not decode
    num_clients: int = 0  # connected clients (a daemon's)


class StepOutputs(msgspec.Struct, **_STRUCT):
    updates: list[RequestUpdate]
    stats: SchedulerStats | None = None
    timestamp: float = 0.0


class UtilityReply(msgspec.Struct, **_STRUCT):
    call_id: int
    result: Any = None
    error: str | None = None
    error_kind: str | None = None  # with `error`: "permission" (the caller lacks the admin role)


class FrameRejected(msgspec.Struct, **_STRUCT):
    """A frame from this client did not decode and named no request or call to answer."""

    error: str


class EngineDead(msgspec.Struct, **_STRUCT):
    """The engine is going down; every waiting request fails with `error`. (A daemon's
    clients then wait for it, or its successor, to come back.)"""

    error: str


class Disconnected(msgspec.Struct, **_STRUCT):
    """engine-core does not know this client (it never said Hello, or was silent for longer
    than the client timeout and was forgotten, its requests aborted): say Hello again."""

    error: str


CoreMessage = Union[
    Ready, StartupFailed, StepOutputs, UtilityReply, FrameRejected, EngineDead, Disconnected
]


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
    return _decode(_codec("client", lambda: msgspec.msgpack.Decoder(ClientMessage)), frame)


def decode_core_message(frame: bytes) -> CoreMessage:
    return _decode(_codec("core", lambda: msgspec.msgpack.Decoder(CoreMessage)), frame)


def decode_untyped(frame: bytes) -> Any:
    """Plain msgpack, for reading what a frame that failed its typed decode names."""
    return _decode(_codec("untyped", msgspec.msgpack.Decoder), frame)


def _decode(decoder: msgspec.msgpack.Decoder, frame: bytes) -> Any:
    """Every way a frame can fail to decode is a `msgspec.DecodeError` or `ValidationError`:
    msgspec lets invalid UTF-8 in a tag escape as `UnicodeDecodeError`, which would end
    the socket thread that read it."""
    try:
        return decoder.decode(frame)
    except UnicodeDecodeError as e:
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {e}") from None
