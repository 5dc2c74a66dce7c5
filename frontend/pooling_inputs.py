"""Prompts of `encode()` / `embed()` in, checked token ids and resolved `PoolingParams` out.

Everything the engine would refuse is refused here, with a `ValueError` naming the field,
before anything is sent. `truncate_prompt_tokens` keeps the last k tokens, as vLLM does: a
text prompt keeps its special tokens ([CLS] ... [SEP]), token ids are cut as given.
"""

from __future__ import annotations

from collections.abc import Mapping

from zllm.frontend.input_processor import InputProcessor, PromptType
from zllm.protocol.messages import Ready
from zllm.protocol.pooling_params import PoolingParams


class PoolingInputs:
    def __init__(self, processor: InputProcessor, ready: Ready) -> None:
        self.processor = processor
        self.model_config = ready.model_config
        self.max_num_batched_tokens = ready.max_num_batched_tokens

    def prepare(
        self, prompt: PromptType, params: PoolingParams
    ) -> tuple[str | None, list[int], PoolingParams]:
        """(prompt text or None, token ids, params with `normalize` resolved)."""
        config = self.model_config
        if "embed" not in config.supported_tasks:
            raise ValueError(
                f"encode()/embed() need a pooling model; this engine runs {config.architecture} "
                "for generation only (start it with runner='pooling' or runner='auto')"
            )
        if not isinstance(params, PoolingParams):
            raise TypeError(f"pooling_params must be PoolingParams, got {type(params).__name__}")
        self._check_dimensions(params)
        text, ids = self.processor.tokenize(prompt)
        if params.truncate_prompt_tokens is not None:
            keep = params.truncate_prompt_tokens
            if keep == -1:
                keep = config.max_model_len
            elif keep > config.max_model_len:
                raise ValueError(
                    f"PoolingParams.truncate_prompt_tokens={keep} is larger than "
                    f"max_model_len={config.max_model_len}"
                )
            from_text = isinstance(prompt, str) or (
                isinstance(prompt, Mapping) and "prompt_token_ids" not in prompt
            )
            ids = self._truncate(ids, keep) if from_text else ids[-keep:]
        self._check_length(ids)
        assert config.pooler_config is not None
        if params.normalize is None:
            params = params.clone(normalize=config.pooler_config.normalize)
        return text, ids, params

    def _check_dimensions(self, params: PoolingParams) -> None:
        """vLLM's rule: only a Matryoshka model may cut its vectors (to the sizes it lists)."""
        if params.dimensions is None:
            return
        pooler = self.model_config.pooler_config
        assert pooler is not None
        if not pooler.is_matryoshka:
            raise ValueError(
                f"PoolingParams.dimensions: model {self.model_config.architecture} does not "
                "support Matryoshka representation; changing the output dimensions would "
                "give poor results"
            )
        allowed = pooler.matryoshka_dimensions
        if allowed is not None and params.dimensions not in allowed:
            raise ValueError(
                f"PoolingParams.dimensions must be one of the model's Matryoshka dimensions "
                f"{allowed}, got {params.dimensions}"
            )
        if params.dimensions > self.model_config.hidden_size:
            raise ValueError(
                f"PoolingParams.dimensions must be <= the model's hidden size "
                f"{self.model_config.hidden_size}, got {params.dimensions}"
            )

    def _truncate(self, ids: list[int], keep: int) -> list[int]:
        """The last `keep` tokens of a tokenized text, the special tokens the tokenizer added
        around it kept (the tokenizer's own left truncation)."""
        if len(ids) <= keep:
            return ids
        special = set(self.processor.tokenizer.all_special_ids)
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
        return (
            ids[:lead] + ids[len(ids) - trail - body : len(ids) - trail] + ids[len(ids) - trail :]
        )

    def _check_length(self, ids: list[int]) -> None:
        config = self.model_config
        n = len(ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > config.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, more than max_model_len={config.max_model_len} "
                "(set PoolingParams.truncate_prompt_tokens to cut it)"
            )
        if not config.is_causal and n > self.max_num_batched_tokens:
            raise ValueError(
                f"the prompt has {n} tokens; an encoder runs each prompt in one step, and "
                f"max_num_batched_tokens={self.max_num_batched_tokens}"
            )
        vocab = config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        needed = -(-n // self.processor.block_size)
        if needed > self.processor.num_kv_blocks:
            raise ValueError(
                f"the prompt needs {needed} KV blocks but the engine's whole KV cache has "
                f"{self.processor.num_kv_blocks}"
            )
