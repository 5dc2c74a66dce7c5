"""The engine's step: schedule -> execute -> update, with no sockets and no threads.

`core/server.py` wraps this in the process that talks to frontends; tests can drive it
directly.

With `async_scheduling` (the default), steps N+1 and N+2 are scheduled and sent while the
workers run step N (SGLang's overlap scheduler, vLLM's async scheduling, one step deeper): a
request whose token a step in flight is sampling gets a placeholder, and the worker feeds
its own sampled token into the next step. Step N's results are then applied as they come: a
request that step N finished (EOS, a stop token, `max_tokens`) or that was aborted
meanwhile shows nothing of the steps after it, and `max_tokens` never schedules a step too
many (`Request.awaits_last_token`).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from zllm.core.executor import Executor
from zllm.core.kv_cache_manager import KVCacheManager
from zllm.core.request import Request, RequestStatus
from zllm.core.scheduler import ScheduledStep, Scheduler
from zllm.core.worker_batch import WorkerBatch
from zllm.protocol.admission import AdmissionLimits, request_error
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.messages import AddRequest, RequestUpdate, SchedulerStats
from zllm.protocol.worker_messages import ModelOutput, WorkerSlot

logger = logging.getLogger(__name__)

# Steps left in flight when engine-core waits for the oldest one's results. With one, the
# device idles unless the worker's reply, engine-core's whole step (results, outputs, the
# next schedule) and the worker's launch of that schedule fit inside one device step; with
# two, each only has to keep pace with the device (H100, 256 requests of Qwen2.5-0.5B: GPU
# busy 77% -> 92%, bench/RESULTS.md). A finished request's results from the steps in flight
# are dropped, so the only cost is up to two steps of its compute.
STEPS_AHEAD = 2


@dataclass
class _InFlight:
    """A step sent to the workers whose results have not come back yet."""

    step: ScheduledStep
    slots: list[WorkerSlot]  # the slot of each of its requests, as they were then


class EngineCore:
    def __init__(
        self, engine_args: EngineArgs, model_config: ModelConfig, executor: Executor
    ) -> None:
        self.engine_args = engine_args
        self.model_config = model_config
        self.executor = executor
        self.max_num_batched_tokens = engine_args.resolved_max_num_batched_tokens(
            model_config.max_model_len, model_config.pooling_only
        )
        if (
            not engine_args.enable_chunked_prefill
            and self.max_num_batched_tokens < model_config.max_model_len
        ):
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than "
                f"max_model_len={model_config.max_model_len}; enable chunked prefill or raise it"
            )
        self.kv = KVCacheManager(
            executor.num_kv_blocks, engine_args.block_size, engine_args.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs=engine_args.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=engine_args.enable_chunked_prefill,
            policy=engine_args.scheduling_policy,
        )
        self.limits = AdmissionLimits.of(
            engine_args, model_config, self.kv.num_blocks, self.max_num_batched_tokens
        )
        self.worker_batch = WorkerBatch(self.kv)
        self.async_scheduling = engine_args.async_scheduling and executor.runs_concurrently
        self.steps_ahead = STEPS_AHEAD if self.async_scheduling else 0
        self._in_flight: deque[_InFlight] = deque()
        self._ready: list[tuple[bytes, RequestUpdate]] = []  # results of steps waited for early
        self.sleeping_level = 0
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens); max concurrency at %d tokens/request: %.1fx",
            self.kv.num_blocks,
            self.kv.block_size,
            self.kv.num_blocks * self.kv.block_size,
            model_config.max_model_len,
            self.kv.num_blocks * self.kv.block_size / model_config.max_model_len,
        )

    @staticmethod
    def request_key(client: bytes, request_id: str) -> str:
        return f"{client.hex()}/{request_id}"

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, client: bytes, message: AddRequest) -> RequestUpdate | None:
        """Queue a request; a refusal comes back as a finished update carrying the error."""
        key = self.request_key(client, message.request_id)
        error, kind = self._admission_error(key, message), "invalid"
        if error is None and self._overloaded():
            error, kind = (
                f"engine overloaded: {len(self.scheduler.waiting)} requests are waiting "
                f"(max_queued_requests={self.engine_args.max_queued_requests}); retry later",
                "overloaded",
            )
        if error is not None:
            return RequestUpdate.refused(message.request_id, error, kind)
        pooler = self.model_config.pooler_config
        self.scheduler.add(
            Request(
                key=key,
                client=client,
                request_id=message.request_id,
                prompt_token_ids=message.prompt_token_ids,
                sampling_params=message.sampling_params,
                eos_token_ids=self.model_config.eos_token_ids,
                max_model_len=self.model_config.max_model_len,
                pooling_params=message.pooling_params,
                is_causal=self.model_config.is_causal,
                pools_last_token_only=pooler is None or pooler.pooling_type == "LAST",
                priority=message.priority,
            )
        )
        return None

    def _admission_error(self, key: str, message: AddRequest) -> str | None:
        """The shared rules (`protocol/admission.py`; engine-core's frame reader applied them
        already, so that floods never reach this thread: this is for every other caller),
        then what only the engine's state can refuse."""
        if key in self.scheduler.requests:
            return f"request id {message.request_id!r} is already running"
        return request_error(message, self.limits)

    def _overloaded(self) -> bool:
        limit = self.engine_args.max_queued_requests
        return limit is not None and len(self.scheduler.waiting) >= limit

    def abort(self, keys: list[str]) -> list[Request]:
        aborted = []
        for key in keys:
            request = self.scheduler.requests.get(key)
            if request is not None:
                self.scheduler.finish(request, "abort")
                aborted.append(request)
        return aborted

    def abort_client(self, client: bytes) -> list[Request]:
        return self.abort([r.key for r in self.scheduler.requests.values() if r.client == client])

    def has_work(self) -> bool:
        if self._ready:
            return True
        return self.sleeping_level == 0 and (self.scheduler.has_work() or bool(self._in_flight))

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> list[tuple[bytes, RequestUpdate]]:
        """Schedule and send the next step; return (client, update) for every request that got
        a token, finished, or had a chunk of its prompt scored (prompt logprobs), from the
        steps that came back meanwhile. With overlap, the newest step stays in flight."""
        updates, self._ready = self._ready, []
        if self.sleeping_level:
            return updates
        step = self.scheduler.schedule()
        message, slots = self.worker_batch.build(step)
        self.scheduler.release_pooled(step)  # after `build`, which sends their block ids
        if step.requests:
            self.executor.submit(message)
            self._in_flight.append(_InFlight(step, slots))
        keep = self.steps_ahead if step.requests else 0
        while len(self._in_flight) > keep:
            updates += self._collect()
        return updates

    def _collect(self) -> list[tuple[bytes, RequestUpdate]]:
        """Wait for the oldest step in flight and apply its results."""
        flight = self._in_flight.popleft()
        return self._apply(flight.step, flight.slots, self.executor.get_output())

    def _drain(self) -> None:
        """Finish every step in flight (before the workers' state changes under them)."""
        while self._in_flight:
            self._ready += self._collect()

    def _apply(
        self, step: ScheduledStep, slots: list[WorkerSlot], output: ModelOutput
    ) -> list[tuple[bytes, RequestUpdate]]:
        """Apply a step's results in one pass over its requests: each whose chunk ended its
        tokens takes its result (`Scheduler.take_result`), and each with something to show
        gets an update. One finished while the step ran (aborted, or ended by the step
        before) shows nothing."""
        sampled = output.sampled_token_ids
        if len(sampled) != step.num_sampled:
            raise RuntimeError(
                f"the workers sampled {len(sampled)} tokens in a step that "
                f"asked for {step.num_sampled}"
            )
        logprobs, pooled, prompt_logprobs = output.logprobs, output.pooled, output.prompt_logprobs
        if logprobs and len(logprobs) != len(sampled):
            raise RuntimeError(
                f"the workers sent logprobs for {len(logprobs)} of {len(sampled)} sampled tokens"
            )
        take_result, finished = self.scheduler.take_result, RequestStatus.FINISHED
        updates = []
        i = 0  # the next of `sampled`: one token per sampling request, in batch order
        for request, ends, slot in zip(step.requests, step.ends_tokens, slots):
            token = new_logprobs = None
            if ends and request.pooling_params is None:
                token = sampled[i]
                if logprobs:
                    new_logprobs = logprobs[i]
                i += 1
            if request.status is finished:
                continue
            if ends:
                take_result(request, token)
            if pooled and slot in pooled:
                updates.append((request.client, self._pooled_update(request, pooled[slot])))
                continue
            scored = prompt_logprobs.get(slot) if prompt_logprobs else None
            if token is None and scored is None:
                continue
            update = RequestUpdate(
                request_id=request.request_id,
                new_token_ids=[] if token is None else [token],
                finish_reason=request.finish_reason,
                stop_reason=request.stop_reason,
                new_logprobs=new_logprobs,
                prompt_logprobs=scored,
                num_cached_tokens=request.num_cached_tokens,  # set when it was admitted
                queue_time=request.take_queue_time(),
            )
            updates.append((request.client, update))
        return updates

    @staticmethod
    def _pooled_update(request: Request, pooled: bytes) -> RequestUpdate:
        return RequestUpdate(
            request_id=request.request_id,
            new_token_ids=[],
            finish_reason=request.finish_reason,
            num_cached_tokens=request.num_cached_tokens,  # set when it was admitted
            pooled=pooled,
            queue_time=request.take_queue_time(),
        )

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    # ---- utilities (called by name from frontends) ----------------------------------------------

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        self._drain()
        if self.scheduler.running:
            # Running requests would lose their KV: send them back to recompute after wake-up.
            for request in list(reversed(self.scheduler.running)):
                self.scheduler.preempt(request)
        self.kv.reset_prefix_cache()
        self.executor.collective_rpc("sleep", level)
        self.sleeping_level = level

    def wake_up(self, tags: list[str] | None = None) -> None:
        still_asleep = self.executor.collective_rpc("wake_up", tags)[0]
        if not still_asleep:  # steps run again only once weights and KV cache are both back
            self.sleeping_level = 0

    def is_sleeping(self) -> bool:
        return self.sleeping_level > 0

    def shutdown(self) -> None:
        self.executor.shutdown()
