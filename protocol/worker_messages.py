"""Messages between engine-core and its workers (private IPC sockets, msgspec only).

The hot path is `ExecuteModel` -> `ModelOutput` once per step; everything else is a
`WorkerCall` answered by `WorkerReply`.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from zllm.protocol.messages import Logprobs, _codec
from zllm.protocol.messages import encode as encode  # one encoder for every socket
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

_STRUCT = dict(tag=True, kw_only=True, omit_defaults=True)


class NewRequest(msgspec.Struct, kw_only=True, omit_defaults=True, array_like=True):
    """Sent once, the first time a request is scheduled: what the worker keeps per request."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None = None
    pooling_params: PoolingParams | None = None  # set: pool the prompt instead of sampling


class ScheduledChunk(msgspec.Struct, kw_only=True, array_like=True):
    """Tokens of one request to run this step, from position `start`, and where its KV lives."""

    request_id: str
    token_ids: list[int]
    start: int
    block_ids: list[int]
    sample: bool  # the chunk reaches the end of the known tokens: sample the next one (or pool)


class ExecuteModel(msgspec.Struct, **_STRUCT):
    new_requests: list[NewRequest]
    chunks: list[ScheduledChunk]
    finished_request_ids: list[str]


class WorkerCall(msgspec.Struct, **_STRUCT):
    call_id: int
    method: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


CoreToWorker = Union[ExecuteModel, WorkerCall]


class WorkerHello(msgspec.Struct, **_STRUCT):
    """A worker loaded its model; `num_kv_blocks` is what fits in the memory it was given."""

    rank: int
    pid: int
    num_kv_blocks: int


class WorkerFailed(msgspec.Struct, **_STRUCT):
    rank: int
    error: str


class ModelOutput(msgspec.Struct, **_STRUCT):
    """Sampled ids for the chunks that asked for one, in chunk order; pooled vectors of the
    pooling requests whose prompt ended this step (float32 bytes)."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[Logprobs | None] = []
    prompt_logprobs: dict[str, Logprobs] = {}  # per request: this step's chunk of its prompt
    pooled: dict[str, bytes] = {}


class WorkerReply(msgspec.Struct, **_STRUCT):
    rank: int
    call_id: int
    result: Any = None
    error: str | None = None


WorkerToCore = Union[WorkerHello, WorkerFailed, ModelOutput, WorkerReply]


def decode_for_worker(frame: bytes) -> CoreToWorker:
    return _codec("to_worker", lambda: msgspec.msgpack.Decoder(CoreToWorker)).decode(frame)


def decode_for_core(frame: bytes) -> WorkerToCore:
    return _codec("to_core", lambda: msgspec.msgpack.Decoder(WorkerToCore)).decode(frame)
