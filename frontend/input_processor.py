"""Prompts in, token ids out: tokenization, chat templates and admission checks, in the frontend.

Everything that can be refused is refused here, with a `ValueError`, before it reaches the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zllm.frontend.prompts import PROMPT_KEYS, PromptType
from zllm.protocol.messages import Ready
from zllm.protocol.sampling_params import SamplingParams

__all__ = ["InputProcessor", "PromptType"]


class InputProcessor:
    def __init__(self, tokenizer, ready: Ready) -> None:
        self.tokenizer = tokenizer
        self.model_config = ready.model_config
        self.block_size = ready.engine_args.block_size
        self.num_kv_blocks = ready.num_kv_blocks

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids) for a string, `{"prompt": ...}` or `{"prompt_token_ids": [...]}`."""
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, Mapping):
            unknown = set(prompt) - PROMPT_KEYS
            if unknown:
                raise ValueError(
                    f"prompt keys {sorted(unknown)} are not supported by zllm "
                    f"(a prompt dict has {sorted(PROMPT_KEYS)})"
                )
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], None
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise ValueError(
                f"prompt must be a str, a dict or a list of token ids, got {type(prompt).__name__}"
            )
        if ids is None:
            if self.tokenizer is None:
                raise ValueError("no tokenizer (skip_tokenizer_init=True): pass prompt_token_ids")
            ids = self.tokenizer.encode(text)
        return text, ids

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        max_len = self.model_config.max_model_len
        vocab = self.model_config.vocab_size
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= max_len:
            raise ValueError(
                f"the prompt has {n} tokens, but max_model_len is {max_len} (nothing left to generate)"
            )
        if params.max_tokens is not None and n + params.max_tokens > max_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} "
                f"exceeds max_model_len={max_len}"
            )
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        total = n + (params.max_tokens or max_len - n)
        needed = -(-total // self.block_size)
        if needed > self.num_kv_blocks:
            raise ValueError(
                f"the request needs {needed} KV blocks ({total} tokens) but the engine's whole KV cache "
                f"has {self.num_kv_blocks}; lower max_tokens or give the engine more KV memory"
            )

    def chat_prompt(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> dict:
        """A conversation as a prompt: the chat template's text and its token ids (the template
        already holds any special tokens, so none are added again)."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer (skip_tokenizer_init=True): chat needs one")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return {
            "prompt": text,
            "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False),
        }
