"""The prompt shapes `generate` takes, under vLLM's names (`zllm.inputs`): a string, a
`TextPrompt` or a `TokensPrompt` (plain dicts, typed), or a list of token ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict


class TextPrompt(TypedDict):
    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    prompt: str  # shown as `RequestOutput.prompt`; the ids are what runs


PromptType = str | TextPrompt | TokensPrompt | Mapping[str, Any] | list[int]

PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids"})
