"""The `PoolingParams` fields the frontend resolves before an `encode()` / `embed()` request is
sent: the prompt cut to `truncate_prompt_tokens` (as vLLM: the last k tokens; a text prompt
keeps the special tokens its tokenizer put around it, token ids are cut as given) and
`normalize` resolved from the model's pooling config, so the worker never guesses a default.
The rest of the checks are the shared rules (`protocol/admission.py`).
"""

from __future__ import annotations

from zllm.protocol.config import ModelConfig
from zllm.protocol.pooling_params import PoolingParams


def prepare_pooling(
    ids: list[int], params: PoolingParams, from_text: bool, tokenizer, config: ModelConfig
) -> tuple[list[int], PoolingParams]:
    """(token ids, params with `normalize` resolved); `ValueError` naming the field."""
    keep = params.truncate_prompt_tokens
    if keep is not None:
        if keep == -1:
            keep = config.max_model_len
        elif keep > config.max_model_len:
            raise ValueError(
                f"PoolingParams.truncate_prompt_tokens={keep} is larger than "
                f"max_model_len={config.max_model_len}"
            )
        ids = _truncate_text(ids, keep, tokenizer) if from_text else ids[-keep:]
    if params.normalize is None and config.pooler_config is not None:
        params = params.clone(normalize=config.pooler_config.normalize)
    return ids, params


def _truncate_text(ids: list[int], keep: int, tokenizer) -> list[int]:
    """The last `keep` tokens of a tokenized text, the special tokens the tokenizer added
    around it kept (the tokenizer's own left truncation)."""
    if len(ids) <= keep:
        return ids
    special = set(tokenizer.all_special_ids)
    lead = next((i for i, t in enumerate(ids) if t not in special), None)
    if lead is None:  # nothing but special tokens: cut them as given
        return ids[-keep:]
    trail = next(i for i, t in enumerate(reversed(ids)) if t not in special)
    body = keep - lead - trail
    if body < 1:
        raise ValueError(
            f"PoolingParams.truncate_prompt_tokens={keep} leaves no room for the prompt "
            f"besides its {lead + trail} special tokens"
        )
    return ids[:lead] + ids[len(ids) - trail - body : len(ids) - trail] + ids[len(ids) - trail :]
