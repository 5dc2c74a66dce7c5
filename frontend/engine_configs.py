"""The config views vLLM's clients ask for (`get_parallel_config()` and friends).

zllm keeps one `EngineArgs`; these are read-only slices of it (plus what the core reported
at start-up), under vLLM's class and field names so code written for vLLM reads them as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from zllm.frontend.model_config import ModelConfig
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


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True):
    block_size: int
    gpu_memory_utilization: float
    swap_space: float  # GiB; never used: preemption recomputes
    cache_dtype: str
    enable_prefix_caching: bool
    num_gpu_blocks: int  # KV blocks in the cache, whatever the device
    num_cpu_blocks: int = 0


@dataclass(frozen=True)
class VllmConfig:
    """Every view at once, as `AsyncLLM.get_vllm_config()` returns it."""

    model_config: ModelConfig
    cache_config: CacheConfig
    parallel_config: ParallelConfig
    scheduler_config: SchedulerConfig
    decoding_config: DecodingConfig


def cache_config(ready: Ready) -> CacheConfig:
    args = ready.engine_args
    return CacheConfig(
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        swap_space=args.swap_space,
        cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=args.enable_prefix_caching,
        num_gpu_blocks=ready.num_kv_blocks,
    )


def parallel_config(ready: Ready) -> ParallelConfig:
    args = ready.engine_args
    return ParallelConfig(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
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
