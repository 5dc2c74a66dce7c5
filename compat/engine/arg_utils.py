"""`vllm.engine.arg_utils` -> `zllm.engine.arg_utils` (docs/vllm-compat.md)."""

from zllm.protocol.config import AsyncEngineArgs, EngineArgs

__all__ = ["AsyncEngineArgs", "EngineArgs"]
