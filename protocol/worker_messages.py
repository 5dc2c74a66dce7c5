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


# A request has three names, each where it belongs: the caller's `request_id` (frontend <->
# engine-core), the engine's `key` (unique across clients, engine-core only) and the worker's
# `WorkerSlot`: the row of the worker's persistent batch the request holds from its first step
# until it finishes (preemption keeps it). Only slots cross the engine-core <-> worker boundary.
WorkerSlot = int


class NewRequest(msgspec.Struct, kw_only=True, omit_defaults=True, array_like=True):
    """Sent once, the first time a request is scheduled: what the worker keeps in `slot`."""

    slot: WorkerSlot
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None = None
    pooling_params: PoolingParams | None = None  # set: pool the prompt instead of sampling


class SlotStart(msgspec.Struct, array_like=True):
    """A request (re)enters the batch: new, or resumed after preemption. Its block table starts
    empty (`new_block_ids` fill it) and its first `num_computed_tokens` are in the KV cache
    already (a prefix-cache hit)."""

    slot: WorkerSlot
    num_computed_tokens: int


class NewBlocks(msgspec.Struct, array_like=True):
    """Blocks appended to a slot's block table."""

    slot: WorkerSlot
    block_ids: list[int]


class ExecuteModel(msgspec.Struct, **_STRUCT):
    """One step, as a change to the batch the worker keeps (`worker/input_batch.py`).

    The worker knows each request's tokens (the prompt it got once, and every token it
    sampled itself), its block table and how many of its tokens are computed; so a step
    carries only what changed, and a decode step's size does not grow with the context.
    Applied in field order: finished slots are freed (a new request may reuse one in the same
    step), preempted slots lose their blocks, then new requests, starts and blocks arrive.
    """

    finished_slots: list[WorkerSlot] = []
    preempted_slots: list[WorkerSlot] = []
    new_requests: list[NewRequest] = []
    started: list[SlotStart] = []
    new_block_ids: list[NewBlocks] = []
    # The step's requests in batch order, and how many tokens each computes (from its
    # computed count): a request samples (or pools) when that reaches the end of its tokens.
    slots: list[WorkerSlot] = []
    num_scheduled_tokens: list[int] = []


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
    """One token per request of the step that sampled, in batch order (engine-core knows which
    did: those whose chunk reached the end of their tokens); their logprobs when asked; prompt
    logprobs of this step's chunk and the vectors of pooling requests whose prompt ended, by
    slot."""

    sampled_token_ids: list[int]
    logprobs: list[Logprobs | None] = []
    prompt_logprobs: dict[WorkerSlot, Logprobs] = {}
    pooled: dict[WorkerSlot, bytes] = {}  # float32 bytes


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
