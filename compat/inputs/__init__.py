"""`vllm.inputs` -> `zllm.inputs`: the prompt shapes `generate` takes (docs/vllm-compat.md)."""

from zllm.frontend.prompts import PromptType, TextPrompt, TokensPrompt

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]
