"""Named model shapes for benchmarks with random weights (`--shape`), defined once.

A shape becomes a directory holding only `config.json`; the engine builds its weights on
the device (`load_format="dummy"`), and the transformers peer gets the same weights.
"""

from __future__ import annotations

from pathlib import Path

SHAPES: dict[str, dict] = {
    # A small Llama that runs on a CPU: 256 requests x 32-128 in / 128 out in minutes.
    "tiny": dict(
        cls="LlamaConfig",
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        cls="LlamaConfig",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
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


def hf_config(shape: str):
    """The transformers config of a named shape."""
    import transformers

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    spec = dict(SHAPES[shape])
    return getattr(transformers, spec.pop("cls"))(bos_token_id=1, eos_token_id=2, **spec)


def write_shape(shape: str, out: Path) -> Path:
    """A checkpoint directory without weights: just the shape's `config.json`."""
    out.mkdir(parents=True, exist_ok=True)
    hf_config(shape).save_pretrained(out)
    return out
