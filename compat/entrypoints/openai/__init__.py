"""`vllm.entrypoints.openai` -> `zllm.entrypoints.openai` (docs/vllm-compat.md)."""
