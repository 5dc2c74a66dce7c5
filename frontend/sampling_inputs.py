"""The `SamplingParams` fields the frontend resolves before a request is sent: the prompt cut
to `truncate_prompt_tokens`, and `bad_words` turned into token sequences (the worker bans the
last token of each when the others were just generated). Everything refused here is a
`ValueError` naming the field; the vocabulary checks are the shared rules'
(`protocol/admission.py`).
"""

from __future__ import annotations

from zllm.protocol.config import ModelConfig
from zllm.protocol.sampling_params import SamplingParams


def apply_sampling_inputs(
    prompt_token_ids: list[int], params: SamplingParams, tokenizer, model_config: ModelConfig
) -> tuple[list[int], SamplingParams]:
    k = params.truncate_prompt_tokens
    if k is not None:
        max_len = model_config.max_model_len
        if k > max_len:
            raise ValueError(
                f"SamplingParams.truncate_prompt_tokens={k} is larger than max_model_len={max_len}"
            )
        prompt_token_ids = prompt_token_ids[-(max_len if k == -1 else k) :]
    if params.bad_words:
        if tokenizer is None:
            raise ValueError(
                "SamplingParams.bad_words needs a tokenizer (skip_tokenizer_init=True)"
            )
        params = params.clone(_bad_words_token_ids=bad_words_token_ids(params.bad_words, tokenizer))
    return prompt_token_ids, params


def bad_words_token_ids(bad_words: list[str], tokenizer) -> list[list[int]]:
    """Each word as tokens, alone and after a space (a word inside text usually starts with
    one), as vLLM does: the spaced form only when its first token differs and its length does
    not (so with byte-level BPE a word whose bare form splits is banned at the start only)."""
    sequences: list[list[int]] = []
    for word in bad_words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        sequences.append(bare)
        if spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    return sequences
