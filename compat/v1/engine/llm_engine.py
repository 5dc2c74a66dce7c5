"""`vllm.v1.engine.llm_engine` -> `zllm.v1.engine.llm_engine` (docs/vllm-compat.md)."""

from zllm.frontend.llm_engine import LLMEngine

__all__ = ["LLMEngine"]
