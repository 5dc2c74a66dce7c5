"""`vllm.v1.engine.async_llm` -> `zllm.v1.engine.async_llm` (docs/vllm-compat.md)."""

from zllm.frontend.async_llm import AsyncLLM

__all__ = ["AsyncLLM"]
