"""`vllm.v1.metrics` -> `zllm.v1.metrics` (docs/vllm-compat.md)."""
