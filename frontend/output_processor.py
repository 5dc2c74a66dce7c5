"""Turns the engine's per-step token updates into `RequestOutput`s, one request at a time.

Runs in the client's I/O thread: detokenizes, applies stop strings (telling the caller
which requests to abort in the engine), and shapes each output for its `output_kind`.
"""

from __future__ import annotations

import time

from zllm.frontend.detokenizer import IncrementalDetokenizer
from zllm.frontend.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from zllm.protocol.messages import Logprobs, RequestUpdate
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams


class RequestState:
    """Everything the frontend tracks for one completion while it streams."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer,
        index: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.index = index
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
            if params.detokenize and tokenizer is not None
            else None
        )
        self.token_ids: list[int] = []
        self.text = ""
        self.sent_text = 0  # chars already sent (DELTA)
        self.sent_tokens = 0  # tokens already sent (DELTA)
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.sent_logprobs = 0
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0
        self.metrics = RequestMetrics(arrival_time=time.time())
        stops = params.stop or []
        self.hold_back = max((len(s) for s in stops), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, update: RequestUpdate, now: float) -> bool:
        """Fold one update in; True if a stop string finished the request here (abort it in the engine)."""
        if self.metrics.first_token_time is None and update.new_token_ids:
            self.metrics.first_token_time = now
        if update.new_token_ids:
            self.metrics.last_token_time = now
        self.num_cached_tokens = update.num_cached_tokens
        if update.prompt_logprobs is not None:
            self.prompt_logprobs = [None] + _to_logprob_dicts(update.prompt_logprobs)
        if update.new_logprobs is not None and self.logprobs is not None:
            entries = _to_logprob_dicts(update.new_logprobs)
            self.logprobs.extend(entries)
            for token, entry in zip(update.new_token_ids, entries):
                self.cumulative_logprob += entry[token].logprob
        stopped_by_string = False
        for token in update.new_token_ids:
            self.token_ids.append(token)
            if self.detokenizer is None:
                continue
            # EOS / stop tokens end the stream; their text is not part of the output.
            is_last = update.finish_reason is not None and token == update.new_token_ids[-1]
            if (
                is_last
                and update.finish_reason == "stop"
                and not self.params.include_stop_str_in_output
            ):
                if update.stop_reason is None or isinstance(update.stop_reason, int):
                    break
            before = len(self.text)
            self.text += self.detokenizer.step(token)
            if self.params.stop and self._check_stop_strings(before):
                stopped_by_string = True
                break
        if not stopped_by_string and update.finish_reason is not None:
            self.finish_reason = update.finish_reason
            self.stop_reason = update.stop_reason
        if self.finished:
            self.metrics.finished_time = now
        return stopped_by_string

    def _check_stop_strings(self, new_from: int) -> bool:
        """Cut the text at the first stop string that ends in the new text."""
        start = max(0, new_from - self.hold_back)
        for stop in self.params.stop:
            at = self.text.find(stop, start)
            if at != -1:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                self.text = self.text[:end]
                self.finish_reason, self.stop_reason = "stop", stop
                return True
        return False

    def output(self) -> RequestOutput | None:
        """The output to yield now for this request's `output_kind`, or None (nothing new yet)."""
        kind = self.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not self.finished:
            return None
        if kind == RequestOutputKind.DELTA:
            # Hold back text that may be the start of a stop string until we know it is not.
            visible = (
                len(self.text)
                if self.finished or not self.params.stop
                else max(self.sent_text, len(self.text) - self.hold_back)
            )
            text = self.text[self.sent_text : visible]
            tokens = self.token_ids[self.sent_tokens :]
            logprobs = self.logprobs[self.sent_logprobs :] if self.logprobs is not None else None
            if not text and not tokens and not self.finished:
                return None
            self.sent_text, self.sent_tokens = visible, len(self.token_ids)
            self.sent_logprobs = len(self.logprobs) if self.logprobs is not None else 0
        else:
            text, tokens, logprobs = self.text, list(self.token_ids), self.logprobs
        completion = CompletionOutput(
            index=self.index,
            text=text,
            token_ids=tokens,
            cumulative_logprob=self.cumulative_logprob,
            logprobs=list(logprobs) if logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[completion],
            finished=self.finished,
            prompt_logprobs=self.prompt_logprobs,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
        )


def _to_logprob_dicts(lp: Logprobs) -> list[dict[int, Logprob]]:
    """Per position: the chosen token first (with its rank), then the top-k."""
    out = []
    for ids, values, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
        entry: dict[int, Logprob] = {ids[0]: Logprob(values[0], rank)}
        for r, (token, value) in enumerate(zip(ids[1:], values[1:]), start=1):
            entry.setdefault(token, Logprob(value, r))
        out.append(entry)
    return out
