"""Incremental detokenization that never emits half a UTF-8 character.

Built on `tokenizers`' `DecodeStream`, seeded with the prompt so the first generated
token decodes with the spacing it has after the prompt.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = (
            tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer
        )
        try:
            self._stream = DecodeStream(
                ids=prompt_token_ids, skip_special_tokens=skip_special_tokens
            )
        except TypeError:  # older tokenizers: no prompt context
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Text completed by this token ('' while a multi-byte character is still partial)."""
        return self._stream.step(self._tokenizer, token_id) or ""
