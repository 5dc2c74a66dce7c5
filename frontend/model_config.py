"""`ModelConfig` as vLLM users read it (`llm.get_model_config()`, `vllm_config.model_config`).

The engine's own `protocol.config.ModelConfig` is a msgspec Struct that crosses processes;
this is a read-only view over it, in the user's process, with vLLM's names: `model` as the
user gave it, `hf_config` as a transformers `PretrainedConfig`, `dtype` as a `torch.dtype`,
`get_vocab_size()`, `max_logprobs`, the generation-config defaults. Every field of the
struct reads through as well (`eos_token_ids`, `architecture`, ...).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from zllm.protocol import config as protocol_config
from zllm.protocol.config import EngineArgs

logger = logging.getLogger("zllm")

# The generation_config.json keys vLLM turns into default sampling parameters.
GENERATION_DEFAULTS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")


class ModelConfig:
    def __init__(
        self,
        config: protocol_config.ModelConfig,
        engine_args: EngineArgs,
        model: str,
        files: str | None = None,
    ) -> None:
        self._config = config
        self._args = engine_args
        self.model = model  # the name the user gave (a hub id, a path, the default's name)
        # Where config.json and generation_config.json are on this machine: the checkpoint,
        # or a daemon's files as it sent them (`frontend/model_files.py`).
        self._files = files or config.path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._config, name)

    def __repr__(self) -> str:
        return f"ModelConfig(model={self.model!r}, path={self._config.path!r})"

    # ---- vLLM's attributes ---------------------------------------------------------------------

    @property
    def tokenizer(self) -> str:
        return self._config.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._config.max_model_len

    @property
    def dtype(self):
        import torch

        return getattr(torch, self._config.dtype)

    @functools.cached_property
    def hf_config(self):
        """The checkpoint's config as transformers reads it (loaded on first use)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            self._files, trust_remote_code=self._args.trust_remote_code
        )

    @property
    def hf_text_config(self):
        return self.hf_config.get_text_config()

    @property
    def architectures(self) -> list[str]:
        return [self._config.architecture]

    @property
    def max_logprobs(self) -> int:
        return getattr(self._args, "max_logprobs", 20)

    @property
    def served_model_name(self) -> str:
        return self.model

    runner_type = "generate"
    is_multimodal_model = False

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(type(self._config).__struct_fields__))

    def get_vocab_size(self) -> int:
        return self._config.vocab_size

    def get_hidden_size(self) -> int:
        return self._config.hidden_size

    def get_head_size(self) -> int:
        return self._config.head_dim

    def get_num_layers(self, parallel_config: Any = None) -> int:
        return self._config.num_hidden_layers

    def get_num_attention_heads(self, parallel_config: Any = None) -> int:
        return self._config.num_attention_heads // _tp(parallel_config)

    def get_num_kv_heads(self, parallel_config: Any = None) -> int:
        return max(1, self._config.num_key_value_heads // _tp(parallel_config))

    def get_sliding_window(self) -> None:
        return None  # the supported architectures attend to the whole context

    # ---- generation defaults (vLLM's `generation_config` option) --------------------------------

    def get_diff_sampling_param(self) -> dict[str, Any]:
        """The sampling defaults the model's creator recommends, as `SamplingParams` keywords:
        from `generation_config.json` ("auto": the checkpoint's; a folder: that one's; "vllm":
        none), then `override_generation_config` on top."""
        source = self._args.generation_config
        config: dict[str, Any] = {}
        if source != "vllm":
            folder = Path(self._files if source == "auto" else source).expanduser()
            file = folder / "generation_config.json"
            if file.is_file():
                config = json.loads(file.read_text())
        config.update(self._args.override_generation_config or {})
        params = {k: config[k] for k in GENERATION_DEFAULTS if config.get(k) is not None}
        if config.get("max_new_tokens") is not None:
            params["max_tokens"] = config["max_new_tokens"]
        return params


def _tp(parallel_config: Any) -> int:
    return getattr(parallel_config, "tensor_parallel_size", 1) if parallel_config else 1
