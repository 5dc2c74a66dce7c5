"""`vllm.config` -> `zllm.config`: the config views engines return (docs/vllm-compat.md)."""

from zllm.frontend.engine_configs import (
    CacheConfig,
    DecodingConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from zllm.frontend.model_config import ModelConfig

__all__ = [
    "CacheConfig",
    "DecodingConfig",
    "ModelConfig",
    "ParallelConfig",
    "SchedulerConfig",
    "VllmConfig",
]
