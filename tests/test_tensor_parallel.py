"""Tensor parallelism: two worker processes split every layer (gloo on the CPU, NCCL on two
GPUs: `bench/gpu_check.sh tp`), and the greedy tokens are the ones a single rank produces."""

from __future__ import annotations

import json

import pytest

from zllm import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10]}, {"prompt_token_ids": list(range(100, 160))}]
PARAMS = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, detokenize=False)


def _generate(path: str, tp: int) -> list[list[int]]:
    with LLM(path, tensor_parallel_size=tp, skip_tokenizer_init=True) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_two_ranks_match_one(tiny_token_id_checkpoints: dict[str, str], kind: str) -> None:
    single = _generate(tiny_token_id_checkpoints[kind], 1)
    assert all(len(t) == 16 for t in single)
    assert _generate(tiny_token_id_checkpoints[kind], 2) == single


def test_heads_must_divide_across_ranks(tiny_token_id_checkpoints: dict[str, str]) -> None:
    with pytest.raises(Exception, match="tensor_parallel_size=3"):
        LLM(tiny_token_id_checkpoints["llama"], tensor_parallel_size=3, skip_tokenizer_init=True)


@pytest.mark.timeout(120)
def test_two_ranks_embed_like_one(embedding_model_path: str) -> None:
    """BERT's row-parallel layers carry a bias: added once, after the all-reduce."""
    import torch

    sentences = ["A man is eating food.", "Two ranks split every layer of the encoder."]
    vectors = []
    for tp in (1, 2):
        with LLM(embedding_model_path, tensor_parallel_size=tp) as llm:
            vectors.append(torch.tensor([o.outputs.embedding for o in llm.embed(sentences)]))
    assert torch.allclose(vectors[0], vectors[1], atol=1e-5)


@pytest.mark.timeout(180)
def test_an_odd_vocabulary_splits_with_padding(tmp_path) -> None:
    """999 rows over 2 ranks: the embedding and the tied LM head each keep 500 rows, the last
    one padding; the gathered logits drop it, and the tokens are a single rank's."""
    from conftest import build_tiny_checkpoint
    from safetensors.torch import load_file, save_file

    base = build_tiny_checkpoint("qwen2", tmp_path / "base", None)
    config = json.loads((base / "config.json").read_text())
    weights = load_file(base / "model.safetensors")
    weights = {k: v[:999] if "embed_tokens" in k else v for k, v in weights.items()}
    odd = tmp_path / "odd"
    odd.mkdir()
    save_file(weights, odd / "model.safetensors")
    (odd / "config.json").write_text(json.dumps({**config, "vocab_size": 999}))
    single = _generate(str(odd), 1)
    assert _generate(str(odd), 2) == single


def test_each_rank_reads_only_its_shard(monkeypatch, tiny_token_id_checkpoints) -> None:
    """Rank 1 of 2 builds its model from the safetensors file: it reads half of every split
    tensor (its slice, straight from the file) and the whole of the rest (norms)."""
    import torch
    from safetensors import safe_open

    from zllm.protocol.config import ModelConfig
    from zllm.worker import checkpoint_tensor, loader
    from zllm.worker.layers import linear

    monkeypatch.setattr(linear, "tp_rank", lambda: 1)
    monkeypatch.setattr(linear, "tp_size", lambda: 2)
    read = []
    to_device = checkpoint_tensor.CheckpointTensor._to_device
    monkeypatch.setattr(
        checkpoint_tensor.CheckpointTensor,
        "_to_device",
        lambda self, t: read.append(t.numel()) or to_device(self, t),
    )
    path = tiny_token_id_checkpoints["llama"]
    model = loader.load_model(ModelConfig.from_path(path), torch.device("cpu"), torch.float32)
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        full = {name: f.get_tensor(name) for name in f.keys()}
    norms = sum(t.numel() for name, t in full.items() if "norm" in name)
    assert sum(read) == norms + (sum(t.numel() for t in full.values()) - norms) // 2
    rows = model.model.embed_tokens.weight.shape[0]
    assert torch.equal(model.model.embed_tokens.weight, full["model.embed_tokens.weight"][rows:])
    assert torch.equal(model.lm_head.weight, full["lm_head.weight"][rows:])
    down = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(down, full["model.layers.0.mlp.down_proj.weight"][:, down.shape[1] :])
