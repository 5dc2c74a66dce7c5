"""`vllm.v1.engine` -> `zllm.v1.engine` (docs/vllm-compat.md)."""
