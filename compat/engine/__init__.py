"""`vllm.engine` -> `zllm.engine` (docs/vllm-compat.md)."""
