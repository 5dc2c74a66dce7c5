"""Engine logprobs (`CompletionOutput.logprobs`: per position, token id -> `Logprob`, the chosen
token first) in OpenAI's two shapes: the legacy completions one and the chat one."""

from __future__ import annotations

from zllm.frontend.outputs import Logprob

Position = dict[int, Logprob]


def _token_text(token_id: int, entry: Logprob, tokenizer) -> str:
    if entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def _top(position: Position, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens of a position, most likely first."""
    ranked = [(t, lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= k]
    return sorted(ranked, key=lambda item: item[1].rank)


def completion_logprobs(
    token_ids: list[int],
    positions: list[Position | None],
    k: int,
    tokenizer,
    text_offset: int = 0,
) -> dict:
    """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` (a None position: the
    prompt's first token, which has no logprob)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = text_offset
    for token_id, position in zip(token_ids, positions):
        if position is None:
            text = tokenizer.decode([token_id]) if tokenizer is not None else ""
            tokens.append(text)
            token_logprobs.append(None)
            tops.append(None)
        else:
            entry = position[token_id]
            text = _token_text(token_id, entry, tokenizer)
            tokens.append(text)
            token_logprobs.append(entry.logprob)
            tops.append({_token_text(t, lp, tokenizer): lp.logprob for t, lp in _top(position, k)})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _chat_entry(token_id: int, entry: Logprob, tokenizer) -> dict:
    text = _token_text(token_id, entry, tokenizer)
    return {"token": text, "logprob": entry.logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], positions: list[Position], k: int, tokenizer) -> dict:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}`."""
    content = []
    for token_id, position in zip(token_ids, positions):
        item = _chat_entry(token_id, position[token_id], tokenizer)
        item["top_logprobs"] = [_chat_entry(t, lp, tokenizer) for t, lp in _top(position, k)]
        content.append(item)
    return {"content": content}
