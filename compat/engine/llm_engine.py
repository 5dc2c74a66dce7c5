"""`vllm.engine.llm_engine` -> `zllm.engine.llm_engine` (docs/vllm-compat.md)."""

from zllm.frontend.llm_engine import LLMEngine

__all__ = ["LLMEngine"]
