"""Random add / abort / step / finish / preempt sequences against the scheduler and block manager.

Pools are tiny so preemption and eviction happen all the time, and prompts use a 3-token
alphabet so prefixes are shared all the time. A fake worker writes, for every computed
position, the token prefix it stands for into the block slot it was given, so the test also
checks that every request only ever reads KV that is really its own.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from scheduler_results import apply_results

from zllm.core.kv_cache_manager import KVCacheManager, block_hash
from zllm.core.request import Request, RequestStatus
from zllm.core.scheduler import Scheduler
from zllm.protocol.sampling_params import SamplingParams

EOS = 3
MAX_MODEL_LEN = 24
BASE = [0, 1, 2, 0, 1, 2, 2, 1, 0, 0, 1, 1, 2, 2, 0, 0, 2, 1, 1, 0, 2, 0, 1, 2]


def _key(request: Request) -> str:
    return request.key


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(2, 6),
        block_size=st.sampled_from([1, 2, 4]),
        max_num_seqs=st.integers(1, 4),
        budget=st.integers(1, 16),
        chunked=st.booleans(),
        prefix_caching=st.booleans(),
    )
    def setup(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        budget: int,
        chunked: bool,
        prefix_caching: bool,
    ) -> None:
        if not chunked:  # the engine refuses to start otherwise
            budget = max(budget, MAX_MODEL_LEN)
        self.budget = budget
        self.chunked = chunked
        self.kv = KVCacheManager(num_blocks, block_size, prefix_caching)
        self.sched = Scheduler(self.kv, max_num_seqs, budget, chunked)
        self.ended: list[Request] = []
        self.all_requests: list[Request] = []
        self.kv_store: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, slot) -> prefix
        self.told_workers: list[str] = []

    # ---- operations ----------------------------------------------------------------------

    @rule(
        prompts=st.lists(
            st.tuples(
                st.integers(0, 1000),  # which earlier text to share a prefix with
                st.sampled_from([0, 3, 8, 13, MAX_MODEL_LEN]),  # how much of it
                st.lists(st.integers(0, 2), max_size=6),  # then its own tokens
                st.sampled_from([1, 5, 9, 16]),  # max_tokens
                st.sampled_from([b"", b"", b"lora"]),  # extra hash key
            ),
            min_size=1,
            max_size=4,
        )
    )
    def add(self, prompts: list[tuple[int, int, list[int], int, bytes]]) -> None:
        """Requests that share a prefix with a fixed text or with an earlier request (prompt
        and generated tokens), then go their own way."""
        for source, prefix_len, tail, max_tokens, extra in prompts:
            sources = [BASE] + [r.token_ids for r in self.all_requests]
            prompt = (sources[source % len(sources)][:prefix_len] + tail) or [0]
            # Admission refuses what can never fit: clamp instead of drawing again.
            capacity = min(MAX_MODEL_LEN, self.kv.num_blocks * self.kv.block_size)
            prompt = prompt[: capacity - 1]
            key = f"r{len(self.all_requests)}"
            request = Request(
                key=key,
                client=b"c",
                request_id=key,
                prompt_token_ids=prompt,
                sampling_params=SamplingParams(max_tokens=min(max_tokens, capacity - len(prompt))),
                eos_token_ids=[EOS],
                max_model_len=MAX_MODEL_LEN,
                extra_hash_key=extra,
            )
            self.all_requests.append(request)
            self.sched.add(request)

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data(), kind=st.sampled_from(["abort", "finish", "preempt"]))
    def interrupt(self, data: st.DataObject, kind: str) -> None:
        """Abort any request; finish a running one from outside the model (a stop string);
        or preempt a running one. One rule, so swarm testing switches them on and off together."""
        if kind == "abort":
            request = data.draw(st.sampled_from(sorted(self.sched.requests.values(), key=_key)))
            self.sched.finish(request, "abort")
            self.ended.append(request)
        elif self.sched.running:
            request = data.draw(st.sampled_from(self.sched.running))
            if kind == "finish":
                self.sched.finish(request, "stop")
                self.ended.append(request)
            else:
                self.sched.preempt(request)
                assert request.status == RequestStatus.PREEMPTED
                assert request.num_computed_tokens == 0

    @rule(data=st.data(), num_steps=st.integers(1, 8))
    def step(self, data: st.DataObject, num_steps: int) -> None:
        for _ in range(num_steps):
            self._step(lambda: data.draw(st.integers(0, EOS)))

    @rule()
    def reset_prefix_cache(self) -> None:
        in_use = self.kv.num_used_blocks > 0
        assert self.kv.reset_prefix_cache() is not in_use

    def _step(self, draw_token) -> None:
        sched, bs = self.sched, self.kv.block_size
        step = sched.schedule()
        self.told_workers += step.finished_keys
        assert len(step.requests) == len({r.key for r in step.requests})
        assert len(step.requests) <= sched.max_num_seqs
        assert step.total_tokens <= self.budget
        sampled = {}
        for request, n, ends in zip(step.requests, step.num_tokens, step.ends_tokens):
            assert request.status == RequestStatus.RUNNING
            end = request.num_computed_tokens  # counted as computed when scheduled
            start = end - n
            assert 1 <= n and end <= request.num_tokens
            assert ends == (end == request.num_tokens)
            if not self.chunked:
                assert end == request.num_tokens  # a prompt runs whole
            # The fake worker writes this chunk's KV, for every request, before anyone reads.
            blocks = self.kv.block_ids(request)
            assert len(blocks) == self.kv.blocks_needed(end)
            for pos in range(start, end):
                key = (blocks[pos // bs], pos % bs)
                self.kv_store[key] = (request.extra_hash_key, *request.token_ids[: pos + 1])
            if ends:
                sampled[request.key] = draw_token()
        for request in step.requests:
            blocks = self.kv.block_ids(request)
            for pos in range(request.num_computed_tokens):
                want = (request.extra_hash_key, *request.token_ids[: pos + 1])
                assert self.kv_store.get((blocks[pos // bs], pos % bs)) == want, "read wrong KV"
        self.ended += apply_results(sched, step, sampled)

    def teardown(self) -> None:
        """No starvation: with no new work, everything left finishes, and nothing leaks."""
        if not hasattr(self, "sched"):
            return
        for _ in range(2000):
            if not self.sched.has_work():
                break
            self._step(lambda: 0)
        assert not self.sched.has_work(), "requests starved"
        self.check_blocks()
        assert self.kv.num_used_blocks == 0
        # Every request a worker saw is dropped exactly once (the last may still be pending).
        told = self.told_workers + self.sched._finished_keys
        assert len(told) == len(set(told))
        assert set(told) == {r.key for r in self.ended}

    # ---- invariants, after every operation -------------------------------------------------

    @invariant()
    def check_blocks(self) -> None:
        if not hasattr(self, "sched"):
            return
        kv, sched, bs = self.kv, self.sched, self.kv.block_size
        owners = [0] * kv.num_blocks
        for key, blocks in kv.req_blocks.items():
            assert len(blocks) == len(set(blocks)), "a request owns a block twice"
            assert key in sched.requests and sched.requests[key].status == RequestStatus.RUNNING
            for b in blocks:
                owners[b] += 1
        for block in kv.blocks:
            assert block.ref_count == owners[block.block_id], "refcount != owners"
            assert (block.ref_count == 0) == (block.block_id in kv.free_queue)
        used = sum(1 for n in owners if n)
        assert kv.num_used_blocks == used and kv.num_free_blocks + used == kv.num_blocks
        stats = sched.stats()
        assert (stats.kv_blocks_used, stats.kv_blocks_total) == (used, kv.num_blocks)
        assert (stats.num_running, stats.num_waiting) == (len(sched.running), len(sched.waiting))
        assert stats.prefix_cache_hits <= stats.prefix_cache_queries
        # Cached hashes and block hashes agree both ways.
        for h, b in kv.cached.items():
            assert kv.blocks[b].hash == h
        for block in kv.blocks:
            if block.hash is not None:
                assert kv.cached[block.hash] == block.block_id
        for request in self.ended:
            assert request.status == RequestStatus.FINISHED
            assert request.key not in sched.requests
            assert request.key not in kv.req_blocks and request.key not in kv.req_hashes
        assert len(sched.running) <= sched.max_num_seqs
        assert set(sched.requests) == {r.key for r in [*sched.running, *sched.waiting]}
        for request in sched.waiting:
            assert request.num_computed_tokens == 0 and request.key not in kv.req_blocks
        for request in sched.running:
            assert request.num_computed_tokens < request.num_tokens
            blocks = kv.block_ids(request)
            assert len(blocks) == kv.blocks_needed(request.num_computed_tokens)
            # Its full, computed blocks carry its chained hash (or none: a duplicate).
            parent = b""
            for i in range(request.num_computed_tokens // bs):
                tokens = request.token_ids[i * bs : (i + 1) * bs]
                parent = block_hash(parent, tokens, request.extra_hash_key)
                assert kv.blocks[blocks[i]].hash in (parent, None)
                if not kv.enable_prefix_caching:
                    assert kv.blocks[blocks[i]].hash is None


# report_multiple_bugs=False: one bug shrinks in seconds, several at once take minutes.
SchedulerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None, report_multiple_bugs=False
)
test_scheduler_machine = SchedulerMachine.TestCase
