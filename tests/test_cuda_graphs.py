"""Decode steps replayed from CUDA graphs (`worker/cuda_graphs.py`).

On the CPU: the padded layout a graph replays (`build_metadata(..., pad_to=n)`) gives the
real rows the same hidden states as the eager layout and writes no KV for the padded rows
(Triton's interpreter). On a GPU: greedy tokens with graphs equal those without, at batch
sizes between the captured ones, and again after sleep mode moved weights and cache.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from conftest import build_tiny_checkpoint

if not torch.cuda.is_available():  # before the kernels are defined: they run interpreted
    os.environ["TRITON_INTERPRET"] = "1"

from zllm import LLM, SamplingParams
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.worker_messages import ExecuteModel, NewBlocks, NewRequest, SlotStart
from zllm.worker.cuda_graphs import capture_sizes

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, detokenize=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(build_tiny_checkpoint("llama", tmp_path_factory.mktemp("graphs") / "m", None))


def test_capture_sizes_ladder_and_checks() -> None:
    assert capture_sizes(256)[:6] == [1, 2, 4, 8, 16, 32] and capture_sizes(256)[-1] == 256
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(64, [8, 1, 8]) == [1, 8]
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_sizes(4, [1, 8])
    with pytest.raises(ValueError, match="positive"):
        capture_sizes(4, [0])


@needs_triton
def test_padded_decode_layout_matches_eager(checkpoint, monkeypatch) -> None:
    monkeypatch.setenv("ZLLM_ATTENTION_BACKEND", "triton")
    from zllm.worker.worker import Worker

    args = EngineArgs(model=checkpoint, dtype="float32", max_num_seqs=8, max_model_len=128)
    worker = Worker(args, ModelConfig.from_path(checkpoint, max_model_len=128))
    assert worker.graph_sizes == ([] if worker.device.type == "cpu" else capture_sizes(8))
    worker.init_kv_cache(32)
    runner = worker.runner
    prompts = [[5, 6, 7, 8, 9], list(range(20, 57)), [3] * 18]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    worker.execute_model(
        ExecuteModel(
            new_requests=[
                NewRequest(slot=i, prompt_token_ids=p, sampling_params=params)
                for i, p in enumerate(prompts)
            ],
            started=[SlotStart(i, 0) for i in range(3)],
            new_block_ids=[NewBlocks(i, [4 * i + b for b in range(4)]) for i in range(3)],
            slots=[0, 1, 2],
            num_scheduled_tokens=[len(p) for p in prompts],
        )
    )
    inputs = runner.batch.prepare([0, 1, 2], [1, 1, 1])  # the decode step after
    backend, kv = runner.attn_backend, runner.kv_caches
    device = worker.device

    def forward(pad_to: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = pad_to or 3
        ids = torch.zeros(n, dtype=torch.long, device=device)
        pos = torch.full((n,), 9, dtype=torch.long, device=device)  # stale padding, any value
        ids[:3] = torch.from_numpy(inputs.input_ids)
        pos[:3] = torch.from_numpy(inputs.positions)
        with torch.inference_mode():
            meta = backend.build_metadata(inputs, pad_to=pad_to)
            hidden = runner.model(ids, pos, kv, meta)
        return hidden[:3].clone(), [c.clone() for c in kv]

    eager, kv_eager = forward(None)
    padded, kv_padded = forward(8)
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    written = torch.from_numpy(inputs.slot_mapping).to(device)
    for before, after in zip(kv_eager, kv_padded):
        # The real rows wrote their K/V again (equal up to the split reduction's rounding in
        # earlier layers); the padded rows wrote nothing.
        flat_before, flat_after = before.flatten(1, 2), after.flatten(1, 2)
        torch.testing.assert_close(flat_after[:, written], flat_before[:, written])
        flat_after[:, written] = flat_before[:, written]
        assert torch.equal(flat_before, flat_after)
    with pytest.raises(ValueError, match="decode rows"):
        backend.build_metadata(runner.batch.prepare([0], [2]), pad_to=4)  # not a decode
    assert np.all(inputs.num_scheduled == 1)


def _generate(path: str, batch: int, **kwargs) -> list[list[int]]:
    llm = LLM(
        path,
        skip_tokenizer_init=True,
        dtype="float32",
        max_num_seqs=32,
        max_model_len=256,
        gpu_memory_utilization=0.3,
        **kwargs,
    )
    prompts = [{"prompt_token_ids": [7 + i, 100 + 3 * i, 11, 12 + i]} for i in range(batch)]
    try:
        first = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]
        llm.sleep(level=1)
        llm.wake_up()
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]
    finally:
        llm.shutdown()
    assert again == first  # graphs captured again over the moved weights and cache
    return first


@needs_cuda
@needs_triton
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_graphs_give_the_eager_tokens(checkpoint, batch) -> None:
    eager = _generate(checkpoint, batch, enforce_eager=True)
    graphs = _generate(checkpoint, batch)
    assert graphs == eager


@needs_cuda
@needs_triton
def test_graph_logits_sample_as_eager(checkpoint) -> None:
    """Seeded sampling, penalties and logprobs read the graph's logits: same tokens and
    logprobs as eager steps, greedy rows beside sampled ones in one batch."""

    def run(**kwargs) -> list[tuple[list[int], list]]:
        llm = LLM(
            checkpoint,
            skip_tokenizer_init=True,
            dtype="float32",
            max_num_seqs=8,
            max_model_len=256,
            gpu_memory_utilization=0.3,
            **kwargs,
        )
        sampled = SamplingParams(
            max_tokens=10,
            temperature=0.8,
            top_k=20,
            seed=5,
            repetition_penalty=1.2,
            logprobs=2,
            ignore_eos=True,
            detokenize=False,
        )
        prompts = [{"prompt_token_ids": [7 + i, 100 + 3 * i, 11, 12 + i]} for i in range(3)]
        try:
            outs = llm.generate(prompts, [sampled, PARAMS, sampled])
        finally:
            llm.shutdown()
        return [
            (o.outputs[0].token_ids, [sorted(p) for p in o.outputs[0].logprobs or []]) for o in outs
        ]

    eager, graphs = run(enforce_eager=True), run()
    assert [tokens for tokens, _ in graphs] == [tokens for tokens, _ in eager]
    assert [ids for _, ids in graphs] == [ids for _, ids in eager]
