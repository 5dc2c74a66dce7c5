"""`vllm.v1` -> `zllm.v1` (docs/vllm-compat.md)."""
