"""A request as the scheduler sees it: token ids, progress, status."""

from __future__ import annotations

import enum
import time

from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    # A pooling request whose last prompt chunk is in a step in flight: it holds no seat in
    # the batch and no blocks any more, and finishes when that step returns its vector.
    POOLED = "pooled"
    FINISHED = "finished"


class Request:
    """One sequence. `key` is unique across clients: (client identity, client's request id).

    A pooling request (`pooling_params` set, `sampling_params` None) only runs its prompt and
    finishes in the step that computes its last prompt token.
    """

    def __init__(
        self,
        key: str,
        client: bytes,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None,
        eos_token_ids: list[int],
        max_model_len: int,
        extra_hash_key: bytes = b"",
        pooling_params: PoolingParams | None = None,
        is_causal: bool = True,
        pools_last_token_only: bool = True,
        priority: int = 0,
    ) -> None:
        self.key = key
        self.client = client
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.pooling_params = pooling_params
        self.sampling_params = sampling_params
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then generated tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        # Tokens whose KV is in the cache, or will be once the steps in flight ran: a step
        # counts its tokens as computed when it is scheduled.
        self.num_computed_tokens = 0
        # Tokens a step in flight is sampling for this request, not known here yet: the next
        # step may already compute them (the worker feeds its own sampled token back).
        self.num_output_placeholders = 0
        self.num_cached_tokens = -1  # prefix-cache hit on first admission (-1: not admitted yet)
        self.status = RequestStatus.WAITING
        self.priority = priority  # lower first, under scheduling_policy="priority"
        self.arrival_order = -1  # set by the waiting queue that orders by it
        self.queued_at: float | None = time.monotonic()  # None once first scheduled
        self.queue_time: float | None = None  # seconds until first scheduled; reported once
        self.extra_hash_key = extra_hash_key  # besides tokens, what changes the KV (a LoRA id)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        limit = max_model_len - self.num_prompt_tokens
        self.max_tokens = 0
        self.min_tokens = 0  # no stop token or EOS before this many output tokens
        self.stop_ids: set[int] = set()
        self.eos_ids: set[int] = set()
        if sampling_params is not None:
            self.max_tokens = min(sampling_params.max_tokens or limit, limit)
            self.min_tokens = sampling_params.min_tokens
            self.stop_ids = set(sampling_params.stop_token_ids or [])
            if not sampling_params.ignore_eos:
                self.eos_ids = set(eos_token_ids)
        # Causal attention: a block's KV depends only on the tokens up to it, so it may be
        # shared (prefix cache) and computed over several steps (chunked prefill). A request
        # may skip cached positions only if it needs no hidden state there.
        self.is_causal = is_causal
        if sampling_params is None:
            needs_all_positions = not pools_last_token_only
        else:
            needs_all_positions = sampling_params.prompt_logprobs is not None
        self.writes_prefix_cache = is_causal
        self.reads_prefix_cache = is_causal and not needs_all_positions

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def take_queue_time(self) -> float | None:
        """The queue time, for the first update sent about this request (None after)."""
        queue_time, self.queue_time = self.queue_time, None
        return queue_time

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.token_ids) + self.num_output_placeholders

    @property
    def awaits_last_token(self) -> bool:
        """Its last token (by `max_tokens` or the context length) is being sampled already:
        nothing more to schedule."""
        return (
            self.num_output_placeholders > 0
            and self.num_output_tokens + self.num_output_placeholders >= self.max_tokens
        )

    def append_token(self, token_id: int) -> bool:
        """Add a sampled token; return True when it finishes the request."""
        self.token_ids.append(token_id)
        n = len(self.token_ids) - self.num_prompt_tokens  # `num_output_tokens`
        if n >= self.min_tokens:
            if token_id in self.eos_ids:
                self.finish_reason, self.stop_reason = "stop", None
                return True
            if token_id in self.stop_ids:
                self.finish_reason, self.stop_reason = "stop", token_id
                return True
        if n >= self.max_tokens:
            self.finish_reason = "length"
            return True
        return False
