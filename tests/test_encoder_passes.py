"""An encoder's step split into passes (on a CPU, passes of cache-sized activations) gives the
hidden states of the step run in one pass: each prompt attends to itself alone."""

from __future__ import annotations

import numpy as np
import torch

from zllm.protocol.config import ModelConfig
from zllm.worker.input_batch import inputs_for_chunks
from zllm.worker.layers.encoder_attention import EncoderAttentionBackend, _runs
from zllm.worker.loader import load_model


def test_runs_keep_prompts_whole_and_in_order() -> None:
    assert _runs(np.array([5, 5, 5]), None) == [(0, 3)]
    assert _runs(np.array([5, 5, 5]), 15) == [(0, 3)]
    assert _runs(np.array([5, 5, 5]), 10) == [(0, 2), (2, 3)]
    assert _runs(np.array([3, 12, 3, 4]), 10) == [(0, 1), (1, 2), (2, 4)]  # too long: alone


def test_a_step_in_several_passes_equals_one_pass(embedding_model_path) -> None:
    cpu = torch.device("cpu")
    config = ModelConfig.from_path(embedding_model_path)
    model = load_model(config, cpu, torch.float32, False, load_format="dummy", seed=1)
    lengths = [7, 30, 12, 30, 5, 19]
    inputs = inputs_for_chunks([(0, n, list(range(-(-n // 16)))) for n in lengths], 16)
    ids = torch.randint(1000, 20000, (sum(lengths),))
    positions = torch.from_numpy(inputs.positions)

    def hidden(pass_tokens: int) -> torch.Tensor:
        meta = EncoderAttentionBackend(cpu, pass_tokens).build_metadata(inputs)
        return model(ids, positions, [], meta), len(meta)

    whole, one = hidden(10**6)
    split, several = hidden(40)
    assert (one, several) == (1, 4)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
