"""Overlap (`async_scheduling`, on by default): engine-core schedules step N+1 while the worker
runs step N. The tokens are the same with it and without it, through chunked prefill,
preemption, n > 1, stop tokens and seeded sampling; `max_tokens` costs no extra step; and a
request that hits a stop string gets no token past it."""

from __future__ import annotations

import pytest

from zllm import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, detokenize=False)


def _prompts() -> list[dict]:
    return [
        {"prompt_token_ids": [10 + (7 * i + j) % 900 for j in range(5 + 9 * i)]} for i in range(8)
    ]


def _params(stop_token: int) -> list[SamplingParams]:
    """Greedy of several lengths, a stop token, n > 1 of seeded random sampling."""
    return [
        GREEDY,
        GREEDY.clone(max_tokens=3),
        GREEDY.clone(stop_token_ids=[stop_token]),
        SamplingParams(n=3, max_tokens=12, temperature=0.9, seed=7, detokenize=False),
        GREEDY.clone(max_tokens=17),
        SamplingParams(n=2, max_tokens=9, temperature=0.0, detokenize=False),
        GREEDY.clone(max_tokens=1),
        GREEDY,
    ]


def _run(path: str, overlap: bool) -> tuple[list[list[list[int]]], dict[str, float]]:
    # 12 KV blocks of 16 tokens for 8 requests of up to 92 tokens: preemption happens; a
    # 32-token budget splits every longer prompt.
    with LLM(
        path,
        skip_tokenizer_init=True,
        async_scheduling=overlap,
        kv_cache_memory_bytes=12 * 8192,
        max_num_batched_tokens=32,
        max_num_seqs=8,
    ) as llm:
        [probe] = llm.generate(_prompts()[2:3], GREEDY)
        stop_token = probe.outputs[0].token_ids[5]
        outputs = llm.generate(_prompts(), _params(stop_token))
        before = {m.name: m.value for m in llm.get_metrics()}
        llm.generate(_prompts()[:1], GREEDY.clone(max_tokens=8))
        after = {m.name: m.value for m in llm.get_metrics()}
    steps = {name: after[name] - before[name] for name in ("zllm:engine_steps",)}
    steps["vllm:num_preemptions"] = before["vllm:num_preemptions"]
    return [[c.token_ids for c in o.outputs] for o in outputs], steps


@pytest.mark.timeout(180)
def test_overlap_gives_the_same_tokens(tiny_checkpoints) -> None:
    path = tiny_checkpoints["llama"]
    overlapped, overlapped_counts = _run(path, True)
    plain, plain_counts = _run(path, False)
    assert overlapped == plain
    assert [len(c) for c in overlapped[3]] == [12, 12, 12] and len(overlapped[6][0]) == 1
    assert len(overlapped[2][0]) < 24  # the stop token ended it
    assert (
        plain_counts["vllm:num_preemptions"] > 0 and overlapped_counts["vllm:num_preemptions"] > 0
    )
    # 8 tokens from a 5-token prompt: one prefill and 7 decodes, overlapped or not.
    assert overlapped_counts["zllm:engine_steps"] == plain_counts["zllm:engine_steps"] == 8


@pytest.mark.timeout(120)
def test_no_token_past_a_stop_string(tiny_checkpoints) -> None:
    """The frontend finds the stop string and aborts, while the engine has steps in flight:
    none of their tokens reaches the output."""
    prompt = "The capital of France is"
    with LLM(tiny_checkpoints["llama"], max_num_seqs=4) as llm:
        assert llm.engine_args.async_scheduling
        [full] = llm.generate(
            [prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        )
        text, tokens = full.outputs[0].text, full.outputs[0].token_ids
        middle = len(text) // 2
        stop = text[middle : middle + 3]
        assert stop.strip() and text.index(stop) <= middle
        [cut] = llm.generate(
            [prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
        )
        out = cut.outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[: text.index(stop)]
        assert out.token_ids == tokens[: len(out.token_ids)]
        # Its last token is the one that completed the stop string: one fewer does not reach it.
        [shorter] = llm.generate(
            [prompt],
            SamplingParams(max_tokens=len(out.token_ids) - 1, temperature=0.0, ignore_eos=True),
        )
        assert stop not in shorter.outputs[0].text


def _core(tmp_path, executor):
    """An engine-core over `executor` for the tiny shape (no workers, no model)."""
    from zllm.bench.shapes import write_shape
    from zllm.core.engine_core import EngineCore
    from zllm.protocol.config import EngineArgs, ModelConfig

    path = str(write_shape("tiny", tmp_path / "tiny"))
    args = EngineArgs(model=path, max_model_len=256, skip_tokenizer_init=True)
    return EngineCore(args, ModelConfig.from_path(path, max_model_len=256), executor)


def test_engine_core_sends_two_steps_ahead_of_the_results_it_waits_for(tmp_path) -> None:
    """Engine-core waits for step N's results only once steps N+1 and N+2 are sent: the
    worker then always has a step queued behind the one the device runs."""
    from zllm.bench.core_step import InstantExecutor
    from zllm.protocol.messages import AddRequest

    class Recording(InstantExecutor):
        def __init__(self) -> None:
            super().__init__(num_kv_blocks=64)
            self.calls: list[str] = []

        def submit(self, step) -> None:
            self.calls.append("submit")
            super().submit(step)

        def get_output(self):
            self.calls.append("wait")
            return super().get_output()

    executor = Recording()
    core = _core(tmp_path, executor)
    core.add_request(
        b"c", AddRequest(request_id="r", prompt_token_ids=[7] * 8, sampling_params=GREEDY)
    )
    tokens = []
    while core.has_work():
        tokens += [t for _, u in core.step() for t in u.new_token_ids]
    assert len(tokens) == GREEDY.max_tokens  # no token past max_tokens, none lost
    assert executor.calls[:5] == ["submit", "submit", "submit", "wait", "submit"]
    assert executor.calls.count("submit") == GREEDY.max_tokens  # not one step too many


def test_engine_core_names_a_reply_whose_logprobs_miss_tokens(tmp_path) -> None:
    """Logprobs come one per sampled token (None where none was asked): a reply with fewer is
    an error that says so, not a token paired with another token's logprobs."""
    from zllm.bench.core_step import InstantExecutor
    from zllm.protocol.messages import AddRequest

    class Short(InstantExecutor):
        def submit(self, step) -> None:
            super().submit(step)
            self._outputs[-1].logprobs = [None] * (len(step.slots) - 1)

    core = _core(tmp_path, Short(64))
    for i in range(2):
        core.add_request(
            b"c", AddRequest(request_id=f"r{i}", prompt_token_ids=[7] * 8, sampling_params=GREEDY)
        )
    with pytest.raises(RuntimeError, match="logprobs for 1 of 2 sampled tokens"):
        while core.has_work():
            core.step()
