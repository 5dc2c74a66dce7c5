"""Shared fixtures: tiny random checkpoints of each supported shape, and the default model."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every model here is a local directory: sentence-transformers and transformers must not
# spend seconds asking a hub that CI cannot reach.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch loads: OpenMP busy-waiting makes the engines' processes and this one starve
# each other on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A daemon's clients keep its tokenizer and config files here (frontend/model_files.py), not
# in the model cache.
if "ZLLM_ENGINE_FILES" not in os.environ:
    os.environ["ZLLM_ENGINE_FILES"] = tempfile.mkdtemp(prefix="zllm-test-engine-files-")
    atexit.register(shutil.rmtree, os.environ["ZLLM_ENGINE_FILES"], True)

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


def with_max_positions(model: str, out: Path, positions: int = 32768) -> str:
    """A copy of `model` with room for `positions` tokens: a stream that a test must cut off
    (a drain, a forgotten client) cannot finish first, however fast the machine (a tiny
    model's 1,000 tokens took 3 s on CI)."""
    shutil.copytree(model, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    return str(out)


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


@pytest.fixture(scope="session")
def tiny_token_id_checkpoints(tmp_path_factory) -> dict[str, str]:
    """The tiny shapes without a tokenizer (1000-token vocabulary): for tests that prompt with
    token ids, which then run where the default model cannot be fetched (a GPU machine)."""
    root = tmp_path_factory.mktemp("tiny-ids")
    return {kind: str(build_tiny_checkpoint(kind, root / kind, None)) for kind in TINY_SHAPES}


def pytest_configure(config) -> None:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def embedding_model_path() -> str:
    """all-MiniLM-L6-v2, the default embedding model (a BERT encoder, mean pooling)."""
    from zllm.frontend.default_embedding_model import download_default_embedding

    return str(download_default_embedding())


def checkpoint_variant(src: str, out: Path, files: dict[str, object]) -> Path:
    """`src`'s checkpoint (its files symlinked) with `files` (relative path -> JSON) written
    over or added: another config.json, sentence-transformers pooling files, ..."""
    import json

    out.mkdir(parents=True)
    for item in Path(src).iterdir():
        if item.name not in {Path(name).parts[0] for name in files}:
            (out / item.name).symlink_to(item)
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(content))
    return out


def sentence_transformers_files(pooling_mode: str, dim: int, normalize: bool = True) -> dict:
    """modules.json and 1_Pooling/config.json of a Transformer -> Pooling (-> Normalize) model."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    return {
        "modules.json": modules,
        "1_Pooling/config.json": {"embedding_dimension": dim, "pooling_mode": pooling_mode},
    }
