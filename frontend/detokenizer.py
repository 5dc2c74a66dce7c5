"""Incremental detokenization that never emits half a UTF-8 character.

Built on `tokenizers`' `DecodeStream`, seeded with the prompt so the first generated
token decodes with the spacing it has after the prompt.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


def backend(tokenizer):
    """The fast `tokenizers.Tokenizer` behind a transformers tokenizer (or the object itself)."""
    return tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = backend(tokenizer)
        try:
            self._stream = DecodeStream(
                ids=prompt_token_ids, skip_special_tokens=skip_special_tokens
            )
        except TypeError:  # older tokenizers: no prompt context
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Text completed by this token ('' while a multi-byte character is still partial)."""
        return self._stream.step(self._tokenizer, token_id) or ""


class TokenDecoder:
    """One token's text on its own, for `Logprob.decoded_token` (cached: the same few
    thousand ids come back all the time)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = backend(tokenizer)
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < 65536:
                self._cache[token_id] = text
        return text
