"""What an engine serves and how it pools, read from the checkpoint (no engine started)."""

from __future__ import annotations

import pytest
from conftest import checkpoint_variant, sentence_transformers_files

from zllm.protocol.config import EngineArgs, ModelConfig


def test_minilm_pools_as_its_sentence_transformers_files_say(embedding_model_path) -> None:
    config = ModelConfig.from_path(embedding_model_path)  # legacy boolean pooling keys
    assert (config.architecture, config.is_causal) == ("BertModel", False)
    assert config.supported_tasks == ["embed"]
    assert (config.pooler_config.pooling_type, config.pooler_config.normalize) == ("MEAN", True)
    assert not config.pooler_config.is_matryoshka
    assert config.max_model_len == 256  # sentence_bert_config.json's max_seq_length, not 512
    with pytest.raises(ValueError, match="max_seq_length=256"):
        ModelConfig.from_path(embedding_model_path, max_model_len=512)
    with pytest.raises(ValueError, match="runner='generate' needs a model with an LM head"):
        ModelConfig.from_path(embedding_model_path, runner="generate")


def test_runner_decides_what_a_decoder_serves(tiny_checkpoints) -> None:
    path = tiny_checkpoints["llama"]
    auto = ModelConfig.from_path(path)
    assert auto.supported_tasks == ["generate", "embed"]
    assert (auto.pooler_config.pooling_type, auto.pooler_config.normalize) == ("LAST", True)
    assert ModelConfig.from_path(path, runner="generate").pooler_config is None
    assert ModelConfig.from_path(path, runner="pooling").supported_tasks == ["embed"]


def test_an_engine_that_only_pools_takes_vllms_larger_default_steps(
    embedding_model_path, tiny_checkpoints
) -> None:
    """vLLM's defaults: 2048 tokens a step, 32768 for a pooling model (no decode latency to
    protect); an explicit `max_num_batched_tokens` always wins."""
    encoder = ModelConfig.from_path(embedding_model_path)
    decoder = ModelConfig.from_path(tiny_checkpoints["llama"])
    pooling_decoder = ModelConfig.from_path(tiny_checkpoints["llama"], runner="pooling")
    assert (encoder.pooling_only, decoder.pooling_only, pooling_decoder.pooling_only) == (
        True,
        False,
        True,
    )
    args = EngineArgs()
    assert args.resolved_max_num_batched_tokens(256, encoder.pooling_only) == 32768
    assert args.resolved_max_num_batched_tokens(1024, decoder.pooling_only) == 2048
    assert EngineArgs(enable_chunked_prefill=False).resolved_max_num_batched_tokens(4096) == 4096
    explicit = EngineArgs(max_num_batched_tokens=512)
    assert explicit.resolved_max_num_batched_tokens(256, pooling_only=True) == 512


@pytest.mark.parametrize(
    "files,match",
    [
        (sentence_transformers_files("max", 64), "pooling \\['max'\\]"),
        (sentence_transformers_files(["mean", "cls"], 64), "pooling \\['mean', 'cls'\\]"),
        (
            {
                **sentence_transformers_files("mean", 64),
                "modules.json": [
                    {"path": "", "type": "sentence_transformers.models.Transformer"},
                    {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                    {"path": "2_Dense", "type": "sentence_transformers.models.Dense"},
                ],
            },
            "Dense",
        ),
        ({"sentence_bert_config.json": {"do_lower_case": True}}, "do_lower_case"),
    ],
)
def test_pooling_zllm_cannot_reproduce_is_refused(tiny_checkpoints, tmp_path, files, match):
    path = checkpoint_variant(tiny_checkpoints["llama"], tmp_path / "variant", files)
    if "modules.json" not in files:
        files = {**sentence_transformers_files("mean", 64), **files}
        path = checkpoint_variant(tiny_checkpoints["llama"], tmp_path / "with-st", files)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_path(str(path), runner="pooling")
    # runner="auto": a generative checkpoint still generates; it just does not pool
    assert ModelConfig.from_path(str(path)).supported_tasks == ["generate"]
