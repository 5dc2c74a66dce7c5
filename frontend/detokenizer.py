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
    """`spaces_between_special_tokens=False` (with special tokens kept): an added token right
    after another one is its bare content, without the space a decoder may put before it
    (vLLM's rule for fast tokenizers)."""

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = backend(tokenizer)
        self._added: dict[int, str] = {}
        if not (skip_special_tokens or spaces_between_special_tokens):
            self._added = {
                i: t.content for i, t in self._tokenizer.get_added_tokens_decoder().items()
            }
        self._last_added = bool(prompt_token_ids) and prompt_token_ids[-1] in self._added
        try:
            self._stream = DecodeStream(
                ids=prompt_token_ids, skip_special_tokens=skip_special_tokens
            )
        except TypeError:  # older tokenizers: no prompt context
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Text completed by this token ('' while a multi-byte character is still partial)."""
        text = self._stream.step(self._tokenizer, token_id) or ""
        if self._added:
            content = self._added.get(token_id)
            if content is not None and self._last_added:
                text = content
            self._last_added = content is not None
        return text


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
