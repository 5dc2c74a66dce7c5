"""`vllm.entrypoints` -> `zllm.entrypoints` (docs/vllm-compat.md)."""
