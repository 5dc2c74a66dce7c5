"""Random-weight checkpoints of real model shapes, made where they run (no download).

python bench/random_checkpoint.py qwen2.5-0.5b /tmp/ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        cls="Qwen2Config",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        cls="LlamaConfig",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
}


def make_checkpoint(shape: str, out: Path, device: str = "cuda", seed: int = 0):
    """Save a bf16 checkpoint of `shape` with small random weights; return the HF model (the peer)."""
    import torch
    import transformers

    spec = dict(SHAPES[shape])
    config = getattr(transformers, spec.pop("cls"))(bos_token_id=1, eos_token_id=2, **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    if not (out / "config.json").exists():
        model.save_pretrained(out)
    return model


if __name__ == "__main__":
    make_checkpoint(sys.argv[1], Path(sys.argv[2]))
