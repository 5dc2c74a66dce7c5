"""Shared fixtures: tiny random checkpoints of each supported shape, and the default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads: OpenMP busy-waiting makes the engines' processes and this one starve
# each other on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TINY_SHAPES = {
    "llama": dict(
        model_type="llama",
        cls="LlamaConfig",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2",
        cls="Qwen2Config",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3",
        cls="Qwen3Config",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
}


def build_tiny_checkpoint(kind: str, out: Path, tokenizer_dir: str | None, seed: int = 0) -> Path:
    """A random-weight checkpoint of `kind`'s shape that uses the default model's tokenizer
    (without one: a 1000-token vocabulary and no tokenizer, for token-id prompts)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = dict(TINY_SHAPES[kind])
    config_cls = getattr(transformers, spec.pop("cls"))
    spec.pop("model_type")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    config = config_cls(
        vocab_size=len(tokenizer) if tokenizer else 1000,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init default, so logits are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from zllm.frontend.default_model import download_default

    return str(download_default())


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, default_model_path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        kind: str(build_tiny_checkpoint(kind, root / kind, default_model_path))
        for kind in TINY_SHAPES
    }


def pytest_configure(config) -> None:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
