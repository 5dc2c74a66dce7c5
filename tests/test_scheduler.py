"""Scheduler with no model: step budget, chunked prefill, FCFS, preemption, prefix hits.

A fake model "samples" a fixed token for every request whose chunk reaches its last token.
"""

from __future__ import annotations

import zlib

from scheduler_results import apply_results

from zllm.core.kv_cache_manager import KVCacheManager
from zllm.core.request import Request, RequestStatus
from zllm.core.scheduler import ScheduledStep, Scheduler
from zllm.core.worker_batch import WorkerBatch
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams
from zllm.protocol.worker_messages import ExecuteModel

EOS = 2


def make_request(
    key: str, num_prompt: int, max_tokens: int = 4, first: int | None = None
) -> Request:
    """A prompt of consecutive ids from `first` (by default unique to the key: no shared prefix)."""
    first = 1000 * (zlib.crc32(key.encode()) % 10000) if first is None else first
    return Request(
        key=key,
        client=b"c",
        request_id=key,
        prompt_token_ids=list(range(first, first + num_prompt)),
        sampling_params=SamplingParams(max_tokens=max_tokens),
        eos_token_ids=[EOS],
        max_model_len=4096,
    )


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    chunked: bool = True,
    prefix_caching: bool = True,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    return Scheduler(kv, max_num_seqs, max_num_batched_tokens, chunked)


def run_step(sched: Scheduler, token: int = 7) -> tuple[ScheduledStep, dict[str, int]]:
    """One engine step with a fake model; returns the step and the chunk size per request."""
    step = sched.schedule()
    sampled = {r.key: token for r, ends in zip(step.requests, step.ends_tokens) if ends}
    apply_results(sched, step, sampled)
    return step, {r.key: n for r, n in zip(step.requests, step.num_tokens)}


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> int:
    for i in range(max_steps):
        if not sched.has_work():
            return i
        run_step(sched)
    raise AssertionError("requests starved: the scheduler never finished them")


def test_chunked_prefill_splits_a_long_prompt_and_keeps_decodes_running() -> None:
    sched = make_scheduler(max_num_batched_tokens=32)
    sched.add(decoding := make_request("d", 5, max_tokens=20))
    run_step(sched)  # d's prefill
    sched.add(make_request("long", 100))
    chunks = []
    while sched.requests["long"].num_output_tokens == 0:
        step, sizes = run_step(sched)
        assert step.total_tokens <= 32
        assert sizes["d"] == 1  # the decode goes first, every step
        chunks.append(sizes["long"])
    assert chunks == [31, 31, 31, 7]
    assert decoding.num_output_tokens == 5


def test_without_chunked_prefill_a_prompt_runs_whole_or_waits() -> None:
    sched = make_scheduler(max_num_batched_tokens=32, chunked=False)
    sched.add(make_request("a", 20))
    sched.add(make_request("b", 20))
    _, sizes = run_step(sched)
    assert sizes == {"a": 20}  # b does not fit what is left, and is not split
    _, sizes = run_step(sched)
    assert sizes == {"a": 1, "b": 20}


def test_max_num_seqs_counts_running_requests() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for key in "abc":
        sched.add(make_request(key, 3, max_tokens=3))
    _, sizes = run_step(sched)
    assert set(sizes) == {"a", "b"}
    while "a" in sched.requests:
        _, sizes = run_step(sched)
        assert len(sched.running) <= 2 and "c" not in sizes
    _, sizes = run_step(sched)
    assert sizes["c"] == 3


def test_waiting_requests_are_admitted_first_come_first_served() -> None:
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    sched.add(make_request("a", 12, max_tokens=4))  # 4 blocks at the end
    sched.add(make_request("big", 16, max_tokens=4))  # 5 blocks: waits for a
    sched.add(make_request("small", 2, max_tokens=2))  # would fit, but does not overtake
    _, sizes = run_step(sched)
    assert set(sizes) == {"a"}
    while "a" in sched.requests:
        _, sizes = run_step(sched)
        assert "small" not in sizes
    _, sizes = run_step(sched)
    assert "big" in sizes
    run_to_completion(sched)


def test_preemption_frees_the_newest_request_which_resumes_with_its_tokens() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    old = make_request("old", 6, max_tokens=8)  # 14 tokens of KV at most: 4 blocks
    new = make_request("new", 6, max_tokens=8)
    sched.add(old)
    sched.add(new)
    run_step(sched)
    assert sched.running == [old, new] and sched.kv.num_free_blocks == 0
    for _ in range(3):
        run_step(sched)
    # old needed a 3rd block: new was preempted and waits with its generated tokens.
    assert sched.num_preemptions == 1
    assert sched.running == [old] and list(sched.waiting) == [new]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    generated = new.token_ids[new.num_prompt_tokens :]
    assert len(generated) == 3 and sched.kv.block_ids(new) == []
    run_to_completion(sched)
    assert new.token_ids[new.num_prompt_tokens :][:3] == generated
    assert old.num_output_tokens == new.num_output_tokens == 8
    assert sched.kv.num_used_blocks == 0


def test_a_request_preempted_alone_is_its_own_victim() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4, max_num_batched_tokens=64)
    a = make_request("a", 8, max_tokens=4)
    b = make_request("b", 3, max_tokens=4)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 2 blocks, b: 1 block
    step, sizes = run_step(sched)  # a needs a 3rd block: b goes, then a decodes
    assert sizes == {"a": 1} and b.status == RequestStatus.PREEMPTED
    run_to_completion(sched)
    assert a.num_output_tokens == b.num_output_tokens == 4


def test_resumed_request_reuses_its_cached_prefix() -> None:
    sched = make_scheduler(num_blocks=5, block_size=4, max_num_batched_tokens=64)
    a = make_request("a", 8, max_tokens=8)
    b = make_request("b", 8, max_tokens=8)
    sched.add(a)
    sched.add(b)
    while b.status != RequestStatus.PREEMPTED:
        run_step(sched)
    hits_before = sched.kv.prefix_hits
    run_to_completion(sched)
    assert sched.kv.prefix_hits > hits_before  # b's freed blocks were still cached


def test_prefix_hits_skip_computed_tokens_and_count_once_per_admission() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=64)
    sched.add(make_request("a", 10, first=0))
    run_to_completion(sched)
    b = make_request("b", 10, first=0)
    sched.add(b)
    _, sizes = run_step(sched)
    assert sizes == {"b": 2} and b.num_cached_tokens == 8
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20, 8)


def test_lookups_of_a_blocked_request_are_not_counted_every_step() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    sched.add(make_request("a", 8, max_tokens=8))
    sched.add(make_request("b", 12, max_tokens=1))  # blocked until a finishes
    run_step(sched)
    assert list(sched.waiting) == [sched.requests["b"]]
    run_to_completion(sched)
    assert sched.kv.prefix_queries == 20


def test_a_prompt_shares_blocks_scheduled_earlier_in_the_same_step() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=64)
    sched.add(a := make_request("a", 10, first=0))
    sched.add(b := make_request("b", 10, first=0))
    _, sizes = run_step(sched)
    assert sizes == {"a": 10, "b": 2}
    assert sched.kv.block_ids(a)[:2] == sched.kv.block_ids(b)[:2]


def test_abort_returns_blocks_and_tells_the_workers_once() -> None:
    sched = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    batch = WorkerBatch(sched.kv)

    def message() -> ExecuteModel:
        step = sched.schedule()
        built, _ = batch.build(step)
        apply_results(
            sched, step, {r.key: 7 for r, ends in zip(step.requests, step.ends_tokens) if ends}
        )
        return built

    a, b, c = (make_request(k, 6, max_tokens=10) for k in "abc")
    for r in (a, b, c):
        sched.add(r)
    sched.max_num_seqs = 2  # c stays waiting
    first = message()
    assert [n.slot for n in first.new_requests] == first.slots == [0, 1]
    sched.finish(a, "abort")
    sched.finish(c, "abort")  # never reached a worker
    assert a.finish_reason == "abort" and a.status == RequestStatus.FINISHED
    assert message().finished_slots == [0]
    sched.finish(b, "abort")
    assert sched.kv.num_used_blocks == 0 and not sched.has_work()
    assert message() == ExecuteModel()  # nothing runs: the workers hear of b next time
    sched.add(make_request("d", 3))
    last = message()
    assert last.finished_slots == [1] and last.new_requests[0].slot == 0  # a's slot, reused


def test_eos_and_max_tokens_finish_requests() -> None:
    sched = make_scheduler()
    a = make_request("a", 3, max_tokens=5)
    b = make_request("b", 3, max_tokens=5)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    step = sched.schedule()
    finished = apply_results(sched, step, {"a": EOS, "b": 7})
    assert finished == [a] and a.finish_reason == "stop"
    run_to_completion(sched)
    assert b.finish_reason == "length" and b.num_output_tokens == 5


def test_stats_report_the_engine_state() -> None:
    sched = make_scheduler(num_blocks=10, max_num_seqs=1, max_num_batched_tokens=64)
    sched.add(make_request("a", 9))
    sched.add(make_request("b", 5))
    run_step(sched)
    stats = sched.stats()
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    assert (stats.kv_blocks_used, stats.kv_blocks_total) == (3, 10)
    assert stats.num_scheduled_tokens == 9 and stats.num_prefill_tokens == 9
    assert stats.num_steps == 1


def make_pooling_request(key: str, num_prompt: int, client: bytes = b"c") -> Request:
    """An encoder's pooling request: bidirectional, never split, reads no cached prefix."""
    first = 1000 * (zlib.crc32(key.encode()) % 10000)
    return Request(
        key=key,
        client=client,
        request_id=key,
        prompt_token_ids=list(range(first, first + num_prompt)),
        sampling_params=None,
        eos_token_ids=[EOS],
        max_model_len=4096,
        pooling_params=PoolingParams(normalize=True),
        is_causal=False,
        pools_last_token_only=False,
    )


def test_pooled_requests_leave_their_seats_and_blocks_to_the_next_step_while_in_flight() -> None:
    """With overlap, step N+1 is scheduled before step N returns: a full batch of pooling
    requests must not keep it empty (`max_num_seqs`, blocks) while their vectors are computed."""
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    batch = WorkerBatch(sched.kv)
    requests = [make_pooling_request(k, 8) for k in "abcd"]
    for r in requests:
        sched.add(r)
    first = sched.schedule()
    message, _ = batch.build(first)
    assert [r.key for r in first.requests] == ["a", "b"] and len(message.new_block_ids) == 2
    sched.release_pooled(first)
    assert sched.kv.num_used_blocks == 0 and not sched.running
    second = sched.schedule()  # while the first is in flight
    assert [r.key for r in second.requests] == ["c", "d"]
    sched.release_pooled(second)
    sched.finish(requests[2], "abort")  # aborted in flight: finished, nothing else to undo
    assert apply_results(sched, first, {}) == requests[:2]
    assert apply_results(sched, second, {}) == [requests[3]]
    assert [r.finish_reason for r in requests] == ["stop", "stop", "abort", "stop"]
    assert all(r.status == RequestStatus.FINISHED for r in requests)
    assert not sched.has_work() and sched.kv.num_used_blocks == 0
    assert batch.build(sched.schedule())[0] == ExecuteModel()  # slots freed, told next time


def test_waiting_queues_count_their_clients() -> None:
    """The scheduler asks the queue how many clients wait (clients take turns only when
    several do) instead of scanning every waiting request each step."""
    for policy in ("fcfs", "priority"):
        sched = Scheduler(KVCacheManager(64, 4), 8, 32, True, policy)
        a1, a2 = make_pooling_request("a1", 4, b"A"), make_pooling_request("a2", 4, b"A")
        b1 = make_pooling_request("b1", 4, b"B")
        for r in (a1, a2, b1):
            sched.add(r)
        assert sched.waiting.num_clients == 2
        sched.finish(b1, "abort")
        assert sched.waiting.num_clients == 1
        step, _ = run_step(sched)
        assert step.requests == [a1, a2] and sched.waiting.num_clients == 0
