"""`load_format="dummy"`: random weights built on the device from config.json alone, the same
ones `fill_dummy_` gives a transformers model (logprobs agree in float32)."""

from __future__ import annotations

import pytest
import torch

from zllm import LLM, EngineArgs, SamplingParams
from zllm.bench.shapes import hf_config, write_shape
from zllm.frontend.errors import EngineStartupError
from zllm.worker.dummy_weights import fill_dummy_

PROMPTS = [[11, 12, 13, 14, 15], list(range(200, 260))]


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory) -> str:
    return str(write_shape("tiny", tmp_path_factory.mktemp("tiny-shape")))


def test_dummy_weights_equal_the_peers(shape_dir):
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=3, detokenize=False)
    llm = LLM(
        shape_dir,
        load_format="dummy",
        seed=5,
        dtype="float32",  # the peer's (bfloat16 is the CUDA default)
        skip_tokenizer_init=True,
        distributed_executor_backend="uni",
        max_model_len=256,
    )
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    finally:
        llm.shutdown()
    torch.manual_seed(0)  # fill_dummy_ must not depend on the global generator
    model = __import__("transformers").AutoModelForCausalLM.from_config(hf_config("tiny"))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the engine's: its generator's
    model.to(device)
    fill_dummy_(model, seed=5)
    for prompt, out in zip(PROMPTS, outputs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt], device=device)).logits
            logprobs = logits[0, -1].float().log_softmax(-1).cpu()
        first = out.outputs[0].logprobs[0]
        assert out.outputs[0].token_ids[0] == int(logprobs.argmax())
        for token, entry in first.items():
            assert entry.logprob == pytest.approx(float(logprobs[token]), abs=1e-4)


def test_dummy_weights_depend_on_the_seed(shape_dir):
    from zllm.protocol.config import ModelConfig
    from zllm.worker.loader import load_model

    config = ModelConfig.from_path(shape_dir)
    cpu = torch.device("cpu")
    a, b, c = (
        load_model(config, cpu, torch.float32, False, load_format="dummy", seed=s)
        for s in (1, 1, 2)
    )
    wa, wb, wc = (m.model.layers[0].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_without_dummy_a_config_alone_does_not_load(shape_dir):
    with pytest.raises(EngineStartupError, match="safetensors"):
        LLM(shape_dir, skip_tokenizer_init=True, distributed_executor_backend="uni")


def test_unknown_load_format_is_refused():
    with pytest.raises(ValueError, match="load_format"):
        EngineArgs(load_format="gguf")
