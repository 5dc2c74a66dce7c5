"""What engine-core refuses of a pooling request (the frontend checks the same first; a raw
client or a daemon's other clients may not)."""

from __future__ import annotations

from zllm.core.kv_cache_manager import KVCacheManager
from zllm.protocol.config import ModelConfig


def pooling_admission_error(
    model_config: ModelConfig,
    kv: KVCacheManager,
    max_num_batched_tokens: int,
    prompt_token_ids: list[int],
) -> str | None:
    n = len(prompt_token_ids)
    max_len = model_config.max_model_len
    if "embed" not in model_config.supported_tasks:
        return f"this engine does not pool (it serves {model_config.supported_tasks})"
    if n > max_len:
        return f"the prompt has {n} tokens; max_model_len={max_len}"
    vocab = model_config.vocab_size
    if any(t < 0 or t >= vocab for t in prompt_token_ids):
        return f"prompt token ids must be in [0, {vocab})"
    if not model_config.is_causal and n > max_num_batched_tokens:
        return (
            f"the prompt has {n} tokens; an encoder runs a prompt in one step of at most "
            f"max_num_batched_tokens={max_num_batched_tokens}"
        )
    needed = kv.blocks_needed(n)
    if needed > kv.num_blocks:
        return f"the prompt needs {needed} KV blocks but the whole cache has {kv.num_blocks}"
    return None
