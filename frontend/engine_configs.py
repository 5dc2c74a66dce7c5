"""The config views vLLM's clients ask for (`get_parallel_config()` and friends).

zllm keeps one `EngineArgs`; these are read-only slices of it (plus what the core reported
at start-up), under vLLM's class and field names so code written for vLLM reads them as is.
"""

from __future__ import annotations

import msgspec

from zllm.protocol.messages import Ready


class ParallelConfig(msgspec.Struct, frozen=True, kw_only=True):
    tensor_parallel_size: int
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    world_size: int
    distributed_executor_backend: str


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool
    policy: str = "fcfs"


class DecodingConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Structured output settings; zllm has no structured output backend yet."""

    backend: str = "none"


def parallel_config(ready: Ready) -> ParallelConfig:
    args = ready.engine_args
    return ParallelConfig(
        tensor_parallel_size=args.tensor_parallel_size,
        world_size=args.tensor_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
    )


def scheduler_config(ready: Ready) -> SchedulerConfig:
    args = ready.engine_args
    return SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=ready.max_num_batched_tokens,
        max_model_len=ready.model_config.max_model_len,
        enable_chunked_prefill=args.enable_chunked_prefill,
    )
