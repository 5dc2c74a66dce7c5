"""`n > 1`: one request, n completions, as n child requests in the engine (vLLM's fan-out).

Child i is `"{i}_{request_id}"` with `n=1` and, when seeded, `seed + i` (wrapping in 64
bits). The children carry the same prompt, so the prefix cache shares its full blocks: the first child to be
scheduled registers them as it allocates them, and the others find them in the same step
(or the next), so the prompt is prefilled about once. Only child 0 asks for prompt
logprobs (they are the same for all), so the others may read the cache.

The client registers every child under its own engine id with one shared stream (and
aborts them all when the request is aborted); each child's handle folds updates into its
own state and asks the parent for the request's output.
"""

from __future__ import annotations

import threading
from typing import Any

from zllm.frontend.output_processor import RequestState
from zllm.frontend.outputs import RequestMetrics, RequestOutput
from zllm.protocol.messages import RequestUpdate
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams


def child_request_id(index: int, request_id: str) -> str:
    return f"{index}_{request_id}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    changes: dict[str, Any] = {"n": 1}
    if params.seed is not None:  # wrapped into 64 bits: seed 2**63 - 1 with n = 2 is valid
        changes["seed"] = (params.seed + index + 2**63) % 2**64 - 2**63
    if index > 0:
        changes["prompt_logprobs"] = None
    return params.clone(**changes)


class ParentRequest:
    """The n children of one request and the `RequestOutput`s they make together.

    CUMULATIVE outputs carry all n completions (sorted by index) every time; DELTA outputs
    carry the completions with something new; FINAL_ONLY, one output with all n at the end.
    """

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.lock = threading.RLock()  # one lock for all children: outputs read them all
        first = RequestState(
            child_request_id(0, request_id),
            prompt,
            prompt_token_ids,
            child_params(params, 0),
            tokenizer,
            index=0,
            lock=self.lock,
        )
        self.children = [first] + [
            RequestState(
                child_request_id(i, request_id),
                prompt,
                prompt_token_ids,
                child_params(params, i),
                tokenizer,
                index=i,
                arrival_time=first.metrics.arrival_time,
                lock=self.lock,
            )
            for i in range(1, params.n)
        ]
        self.metrics = RequestMetrics(arrival_time=first.metrics.arrival_time)
        self.final_emitted = False

    @property
    def child_ids(self) -> list[str]:
        return [c.request_id for c in self.children]

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)

    def output(self) -> RequestOutput | None:
        with self.lock:
            if self.final_emitted:
                return None
            completions = [c for c in (child.completion() for child in self.children) if c]
            if not completions:
                return None
            if self.params.output_kind != RequestOutputKind.DELTA and len(completions) < len(
                self.children
            ):
                return None  # FINAL_ONLY before every child finished
            finished = self.finished
            self.final_emitted = finished
            self._update_metrics()
            first = self.children[0]
            return RequestOutput(
                request_id=self.request_id,
                prompt=self.prompt,
                prompt_token_ids=self.prompt_token_ids,
                outputs=completions,
                finished=finished,
                prompt_logprobs=first.take_prompt_logprobs()
                if first.metrics.first_token_time is not None
                else None,
                metrics=self.metrics,
                num_cached_tokens=first.num_cached_tokens,
            )

    def _update_metrics(self) -> None:
        def times(name: str) -> list[float]:
            return [t for c in self.children if (t := getattr(c.metrics, name)) is not None]

        first, last, done = (
            times("first_token_time"),
            times("last_token_time"),
            times("finished_time"),
        )
        self.metrics.first_token_time = min(first) if first else None
        self.metrics.last_token_time = max(last) if last else None
        self.metrics.finished_time = max(done) if self.finished and done else None
        queued = times("time_in_queue")
        self.metrics.time_in_queue = min(queued) if queued else None


class ChildHandle:
    """What the client keeps under a child's id: the child's state for updates, the
    parent's for outputs."""

    def __init__(self, parent: ParentRequest, state: RequestState) -> None:
        self.parent = parent
        self.state = state
        self.metrics = state.metrics
        self.lock = parent.lock  # the children's outputs are the parent's: one lock for all

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def streams(self) -> bool:
        return self.state.streams

    def apply(self, update: RequestUpdate, now: float) -> bool:
        return self.state.apply(update, now)

    def abort(self, now: float) -> None:
        self.state.abort(now)

    def output(self) -> RequestOutput | None:
        return self.parent.output()


def fan_out(
    request_id: str,
    prompt: str | None,
    prompt_token_ids: list[int],
    params: SamplingParams,
    tokenizer,
) -> tuple[ParentRequest | None, list[tuple[str, SamplingParams, Any]]]:
    """(the parent if n > 1, [(engine request id, its params, its state)]): what the client
    registers and sends for one user request."""
    if params.n == 1:
        state = RequestState(request_id, prompt, prompt_token_ids, params, tokenizer)
        return None, [(request_id, params, state)]
    parent = ParentRequest(request_id, prompt, prompt_token_ids, params, tokenizer)
    return parent, [(c.request_id, c.params, ChildHandle(parent, c)) for c in parent.children]
