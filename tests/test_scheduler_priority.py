"""`scheduling_policy="priority"` with no model: admission by (priority, arrival), preemption of
the least urgent running request, no reordering among equal priorities; and the engine refuses
a priority it would ignore."""

from __future__ import annotations

import pytest
from test_scheduler import make_request, run_step

from zllm.core.kv_cache_manager import KVCacheManager
from zllm.core.request_queue import create_request_queue
from zllm.core.scheduler import Scheduler
from zllm.protocol.admission import AdmissionLimits, canonical_request, request_error
from zllm.protocol.config import EngineArgs
from zllm.protocol.sampling_params import SamplingParams


def priority_scheduler(num_blocks: int = 64, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, 4, True), max_num_seqs, 32, True, "priority")


def request(key: str, priority: int, num_prompt: int = 4, max_tokens: int = 4):
    r = make_request(key, num_prompt, max_tokens)
    r.priority = priority
    return r


def test_waiting_requests_are_admitted_by_priority_then_arrival() -> None:
    sched = priority_scheduler(max_num_seqs=1)
    for key, priority in [("a", 5), ("b", 1), ("c", 5), ("d", -3), ("e", 1)]:
        sched.add(request(key, priority))
    assert [r.key for r in sched.waiting] == ["d", "b", "e", "a", "c"]
    order = []
    while sched.has_work():
        step, _ = run_step(sched)
        order += [r.key for r in step.requests if r.key not in order]
    assert order == ["d", "b", "e", "a", "c"]


def test_fcfs_keeps_arrival_order() -> None:
    queue = create_request_queue("fcfs")
    for key in "abc":
        queue.add_request(request(key, 0))
    assert [r.key for r in queue] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="scheduling_policy"):
        create_request_queue("lifo")


def test_memory_pressure_preempts_the_least_urgent_running_request() -> None:
    # 6 blocks of 4 tokens: three requests of 8 prompt tokens fill them; decoding needs more.
    sched = priority_scheduler(num_blocks=6)
    urgent, normal, low = (
        request("urgent", 0, 8, 8),
        request("normal", 1, 8, 8),
        request("low", 2, 8, 8),
    )
    for r in (low, urgent, normal):  # arrival order differs from priority order
        sched.add(r)
    run_step(sched)
    assert [r.key for r in sched.running] == ["urgent", "normal", "low"]
    run_step(sched)  # each needs a third block: only the two most urgent can keep going
    assert [r.key for r in sched.running] == ["urgent", "normal"]
    assert [r.key for r in sched.waiting] == ["low"] and sched.num_preemptions == 1


def test_a_preempted_request_keeps_its_place_among_equals() -> None:
    sched = priority_scheduler(max_num_seqs=1)
    first, second = request("first", 1), request("second", 1)
    sched.add(first)
    run_step(sched)
    sched.add(second)
    sched.preempt(first)
    assert [r.key for r in sched.waiting] == ["first", "second"]


def test_priority_needs_the_priority_policy() -> None:
    from zllm.protocol.config import ModelConfig

    config = ModelConfig(
        path="x", tokenizer="x", architecture="LlamaForCausalLM", model_type="llama",
        vocab_size=100, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
        rope_theta=1e4, rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=False,
        attention_bias=False, qk_norm=False, eos_token_ids=[2], max_model_len=64,
    )  # fmt: skip
    add = canonical_request("r", [1, 2, 3], SamplingParams(max_tokens=4), priority=-2)
    fcfs = AdmissionLimits.of(EngineArgs(), config, 16, 64)
    assert "scheduling_policy='priority'" in request_error(add, fcfs)
    priority = AdmissionLimits.of(EngineArgs(scheduling_policy="priority"), config, 16, 64)
    assert request_error(add, priority) is None
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineArgs(scheduling_policy="random")


def test_generate_refuses_what_it_cannot_honour() -> None:
    """vLLM's keywords with a value raise, naming themselves; unknown ones are a TypeError."""
    import asyncio

    from zllm import AsyncLLM

    engine = AsyncLLM.__new__(AsyncLLM)  # the checks come before any engine is needed
    for keyword, value in [("trace_headers", {"x": "1"}), ("lora_request", object())]:
        with pytest.raises(NotImplementedError, match=keyword):
            asyncio.run(anext(engine.generate("Hi", **{keyword: value})))
    with pytest.raises(TypeError, match="no_such_option"):
        engine.generate("Hi", no_such_option=1)
