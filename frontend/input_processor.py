"""Prompts in, checked requests out: tokenization, chat templates and admission, in the frontend.

Everything that can be refused is refused here, with a `ValueError`, before it reaches the
engine, by the same rules (`protocol/admission.py`) engine-core applies again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from zllm.frontend.pooling_inputs import prepare_pooling
from zllm.frontend.prompts import PROMPT_KEYS, PromptType
from zllm.frontend.sampling_inputs import apply_sampling_inputs
from zllm.protocol.admission import AdmissionLimits, canonical_request, request_error
from zllm.protocol.messages import Ready
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

__all__ = ["InputProcessor", "ProcessedRequest", "PromptType"]


@dataclass(frozen=True)
class ProcessedRequest:
    """A request that passed admission: exactly what the engine will be sent."""

    request_id: str  # the caller's
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams  # generate() or encode()
    priority: int = 0  # lower first, under scheduling_policy="priority"


class InputProcessor:
    def __init__(self, tokenizer, ready: Ready) -> None:
        self.tokenizer = tokenizer
        self.model_config = ready.model_config
        self.limits = AdmissionLimits.from_ready(ready)

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams,
        priority: int = 0,
    ) -> ProcessedRequest:
        """Tokenize and check one request; raise `ValueError` saying what is wrong."""
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a str, got {type(request_id).__name__}")
        text, ids = self.tokenize(prompt)
        add = canonical_request(request_id, ids, params, priority=priority)
        if add.pooling_params is not None:
            from_text = isinstance(prompt, str) or "prompt_token_ids" not in prompt
            ids, params = prepare_pooling(
                add.prompt_token_ids,
                add.pooling_params,
                from_text,
                self.tokenizer,
                self.model_config,
            )
            add = msgspec.structs.replace(add, prompt_token_ids=ids, pooling_params=params)
        else:
            ids, params = apply_sampling_inputs(
                add.prompt_token_ids, add.sampling_params, self.tokenizer, self.model_config
            )
            add = msgspec.structs.replace(add, prompt_token_ids=ids, sampling_params=params)
        error = request_error(add, self.limits)
        if error is not None:
            raise ValueError(error)
        return ProcessedRequest(request_id, text, ids, params, add.priority)

    def prompt_token_ids(self, prompt: PromptType) -> list[int]:
        """A prompt's token ids as plain ints (`ValueError` for anything else)."""
        return canonical_request("", self.tokenize(prompt)[1], SamplingParams()).prompt_token_ids

    def tokenize(self, prompt: PromptType) -> tuple[str | None, Any]:
        """(prompt text or None, token ids as given) for a string, `{"prompt": ...}`,
        `{"prompt_token_ids": [...]}` or a list of token ids."""
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, Mapping):
            unknown = set(prompt) - PROMPT_KEYS
            if unknown:
                raise ValueError(
                    f"unsupported prompt keys {sorted(map(str, unknown))}: zllm takes "
                    f"{sorted(PROMPT_KEYS)}"
                )
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], None
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"prompt['prompt'] must be a str, got {type(text).__name__}")
        elif isinstance(prompt, list | tuple):
            text, ids = None, prompt
        else:
            raise ValueError(
                f"prompt must be a str, a dict or a list of token ids, got {type(prompt).__name__}"
            )
        if ids is None:
            if self.tokenizer is None:
                raise ValueError("no tokenizer (skip_tokenizer_init=True): pass prompt_token_ids")
            ids = self.tokenizer.encode(check_text(text))
        return text, ids

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
            "prompt_token_ids": self.tokenizer.encode(check_text(text), add_special_tokens=False),
        }


def check_text(text: str) -> str:
    """Refuse text that is not valid Unicode (lone surrogates cannot become UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"the prompt is not valid Unicode: {e.reason} at character {e.start} "
            f"({text[e.start : e.end]!r})"
        ) from None
    return text
