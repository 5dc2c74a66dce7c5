"""`vllm.outputs` -> `zllm.outputs` (docs/vllm-compat.md)."""

from zllm.frontend.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput

__all__ = ["CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput"]
