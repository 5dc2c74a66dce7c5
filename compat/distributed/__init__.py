"""`vllm.distributed` -> `zllm.distributed` (docs/vllm-compat.md)."""

from zllm.frontend.cleanup import cleanup_dist_env_and_memory

__all__ = ["cleanup_dist_env_and_memory"]
