"""Continuous batching: which tokens of which requests run in the next step.

Every request is a list of token ids and a count of those already computed; a step gives
each scheduled request a chunk of its uncomputed tokens. A decode is a chunk of one, a
prompt may be split over several steps (chunked prefill), and a preempted request simply
starts again from zero computed tokens (recompute), keeping what it generated. A pooling
request is a prompt alone, batched like any other; an encoder's prompt is never split.
Running requests go first (decodes before new prefills), then waiting ones in the order of
the scheduling policy (`core/request_queue.py`: arrival, or priority then arrival), clients
taking turns among equal priority (`fair_admission.ClientRoundRobin`).

A step's tokens count as computed when it is scheduled, and a chunk that ends a request's
tokens leaves a placeholder for the token it samples: the next step can be scheduled while
this one runs (`EngineCore`'s overlap), feeding the worker's own sampled token back in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from zllm.core.fair_admission import ClientRoundRobin
from zllm.core.kv_cache_manager import KVCacheManager
from zllm.core.request import Request, RequestStatus
from zllm.core.request_queue import create_request_queue
from zllm.protocol.messages import SchedulerStats


@dataclass
class ScheduledStep:
    """The scheduler's decision for one step, in execution order."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute per request
    # Per request: the chunk reaches the end of its tokens, so the worker samples (or pools).
    ends_tokens: list[bool] = field(default_factory=list)
    finished_keys: list[str] = field(default_factory=list)  # ended since the last step
    preempted_keys: list[str] = field(default_factory=list)  # lost their blocks since then
    pooled: list[Request] = field(default_factory=list)  # pooling requests it ends

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def num_sampled(self) -> int:
        """Requests the workers sample a token for: chunks that end their tokens, but for
        pooling requests."""
        return sum(self.ends_tokens) - len(self.pooled)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
        policy: str = "fcfs",
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting = create_request_queue(policy)
        self.by_priority = policy == "priority"
        self.admission_order = ClientRoundRobin()
        self.running: list[Request] = []  # in the policy's order: the last is preempted first
        self.requests: dict[str, Request] = {}
        self._finished_keys: list[str] = []
        self._preempted_keys: list[str] = []
        self.num_preemptions = 0
        self.num_prefill_tokens = 0
        self.num_steps = 0
        self._last_scheduled_tokens = 0

    # ---- requests in and out -------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.requests[request.key] = request
        self.waiting.add_request(request)

    def finish(self, request: Request, reason: str) -> None:
        """End a request (finished or aborted) and return its blocks."""
        if request.status == RequestStatus.FINISHED:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status != RequestStatus.POOLED:
            self.waiting.remove_request(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = request.finish_reason or reason
        self.kv.free(request)
        del self.requests[request.key]
        self._finished_keys.append(request.key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(finished_keys=self._finished_keys, preempted_keys=self._preempted_keys)
        self._finished_keys, self._preempted_keys = [], []
        budget = self.max_num_batched_tokens
        preempted = False

        # Running requests first (this loop runs for every request at every step: engine-core's
        # hottest, hence the properties spelled out).
        running, allocate = self.running, self.kv.allocate_slots
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            placeholders = request.num_output_placeholders
            known = len(request.token_ids) + placeholders  # `num_tokens_with_placeholders`
            computed = request.num_computed_tokens
            n = known - computed
            if n > budget:
                n = budget
            if n == 0 or (  # `awaits_last_token`: its step in flight ends what it has to do
                placeholders and known - request.num_prompt_tokens >= request.max_tokens
            ):
                i += 1
                continue
            while not allocate(request, n):
                victim = running[-1]
                self.preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                self._add_to_step(step, request, n)
                budget -= n
                i += 1

        can_admit = budget > 0 and not preempted and len(self.running) < self.max_num_seqs
        for request in self._admission_candidates() if can_admit else ():
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if request.num_output_placeholders:  # preempted while a step samples for it
                break
            computed, num_cached = self.kv.get_computed_blocks(request)
            n = request.num_tokens - num_cached
            if n > budget:
                # Bidirectional attention needs the whole prompt in one step.
                if not self.enable_chunked_prefill or not request.is_causal:
                    break
                n = budget
            if not self.kv.allocate_slots(request, n, computed):
                break
            if self.waiting.peek_request() is request:
                self.waiting.pop_request()
            else:
                self.waiting.remove_request(request)
            self.admission_order.admitted(request)
            self.kv.record_lookup(request, num_cached)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.queued_at is not None:  # first scheduled: its queue time is known
                request.queue_time = time.monotonic() - request.queued_at
                request.queued_at = None
            self.waiting.add_running(self.running, request)
            self._add_to_step(step, request, n)
            budget -= n

        self.num_steps += bool(step.requests)
        self._last_scheduled_tokens = step.total_tokens
        return step

    def _add_to_step(self, step: ScheduledStep, request: Request, n: int) -> None:
        """Schedule `n` more tokens of `request`: they count as computed now, and a chunk that
        reaches the end of its tokens leaves a placeholder for the token it samples."""
        computed = request.num_computed_tokens
        if computed < request.num_prompt_tokens:
            self.num_prefill_tokens += min(computed + n, request.num_prompt_tokens) - computed
        request.num_computed_tokens = computed + n
        placeholders = request.num_output_placeholders
        ends = computed + n == len(request.token_ids) + placeholders
        step.requests.append(request)
        step.num_tokens.append(n)
        step.ends_tokens.append(ends)
        if ends and request.pooling_params is not None:
            step.pooled.append(request)
        elif ends:
            request.num_output_placeholders = placeholders + 1

    def release_pooled(self, step: ScheduledStep) -> None:
        """Pooling requests whose last prompt chunk is in `step` (built and sent) give their
        seat in the batch and their blocks to the next step now, not when their vectors come
        back: the next step is then scheduled while this one runs. Otherwise a full batch of
        short prompts would leave no room for the next step until this one returned, and
        engine-core and the workers would take turns. Freeing blocks a step in flight still
        writes is safe: every later step runs after it."""
        released = [r for r in step.pooled if r.status == RequestStatus.RUNNING]
        if not released:  # a generation step: nothing to look at
            return
        for request in released:
            request.status = RequestStatus.POOLED
            self.kv.free(request)
        self.running[:] = [r for r in self.running if r.status == RequestStatus.RUNNING]

    def _admission_candidates(self) -> Iterator[Request]:
        """Waiting requests in the order to admit them; the loop above admits each (taking it
        out of the queue) or stops. With one client that order is the queue's own: its head,
        again after each admission, so a step costs O(admitted), not O(waiting) (10,000
        queued embeddings must not cost a scan per step)."""
        if self.waiting.num_clients > 1:
            yield from self.admission_order.order(self.waiting, self.by_priority)
            return
        while self.waiting:
            head = self.waiting.peek_request()
            yield head
            if self.waiting and self.waiting.peek_request() is head:
                return  # not admitted: the loop stopped

    def preempt(self, request: Request) -> None:
        """Free a running request's blocks; it waits again (at the front of its priority) and
        recomputes later."""
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self.waiting.prepend_request(request)
        self._preempted_keys.append(request.key)
        self.num_preemptions += 1

    def take_result(self, request: Request, token: int | None) -> bool:
        """The result of a step whose chunk ended `request`'s tokens, for a request not
        finished since (aborted, or ended by an earlier step while this one was in flight:
        its token is never seen; one preempted meanwhile keeps its token, sampled from its
        real context): a pooling request is done (its blocks went back when that step was
        sent, `release_pooled`); a generating one takes its sampled token in place of its
        placeholder, and may finish. True if it finished."""
        if request.pooling_params is not None:
            request.finish_reason = "stop"
        else:
            request.num_output_placeholders -= 1
            if token is None or not request.append_token(token):
                return False
        self.finish(request, request.finish_reason or "stop")
        return True

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_total=self.kv.num_blocks,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.num_preemptions,
            num_scheduled_tokens=self._last_scheduled_tokens,
            num_prefill_tokens=self.num_prefill_tokens,
            num_steps=self.num_steps,
        )
