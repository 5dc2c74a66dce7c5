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
        text_ids: list[int] | None = None,
    ) -> ProcessedRequest:
        """Tokenize and check one request; raise `ValueError` saying what is wrong.
        `text_ids`: the prompt's text already tokenized (`batch_text_ids`)."""
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a str, got {type(request_id).__name__}")
        text, ids = self.tokenize(prompt, text_ids)
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

    def tokenize(
        self, prompt: PromptType, text_ids: list[int] | None = None
    ) -> tuple[str | None, Any]:
        """(prompt text or None, token ids as given) for a string, `{"prompt": ...}`,
        `{"prompt_token_ids": [...]}` or a list of token ids. `text_ids`: the text's ids from
        `batch_text_ids`, so it is not tokenized again."""
        text, ids = self._text_or_ids(prompt)
        if ids is None:
            if self.tokenizer is None:
                raise ValueError("no tokenizer (skip_tokenizer_init=True): pass prompt_token_ids")
            ids = text_ids if text_ids is not None else self.tokenizer.encode(check_text(text))
        return text, ids

    def batch_text_ids(self, prompts: list[PromptType]) -> list[list[int] | None]:
        """For each prompt given as text, its token ids, all from one tokenizer call; None
        for a prompt that brings its own ids or that `process` refuses (it then says why).

        A fast tokenizer encodes a batch on every core and pays its Python wrapper once:
        `LLM.encode` of 10,000 sentences must not tokenize them one by one. The ids are
        `tokenizer.encode`'s (special tokens added, nothing cut or padded).
        """
        texts = [self._valid_text(p) for p in prompts]
        todo = [i for i, text in enumerate(texts) if text is not None]
        out: list[list[int] | None] = [None] * len(prompts)
        if self.tokenizer is None or not todo:
            return out
        encoded = self.tokenizer(
            [texts[i] for i in todo], return_attention_mask=False, return_token_type_ids=False
        )["input_ids"]
        for i, ids in zip(todo, encoded):
            out[i] = ids
        return out

    def _valid_text(self, prompt: PromptType) -> str | None:
        """The text `tokenize` would encode for this prompt, or None (ids given, or refused)."""
        try:
            text, ids = self._text_or_ids(prompt)
            return check_text(text) if ids is None and text is not None else None
        except ValueError:
            return None

    @staticmethod
    def _text_or_ids(prompt: PromptType) -> tuple[str | None, Any]:
        """(text, None) for a prompt to tokenize, (text or None, ids) for one with its ids."""
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
