"""Turns the engine's per-step token updates into `RequestOutput`s, one request at a time.

Runs under the state's own lock (`output_delivery.py`): the client's I/O thread detokenizes
and applies stop strings (telling the caller which requests to abort in the engine); each
output is shaped for its `output_kind` when the consumer takes it (or by the aborting
thread), so `output()` holds everything since the last one, however many steps that was.
Streamed text is always a prefix of the final text: text that may be the start of a stop
string is held back until it is known not to be, so DELTA pieces concatenate to exactly the
CUMULATIVE/FINAL text.
"""

from __future__ import annotations

import threading
import time
import weakref

from zllm.frontend.detokenizer import IncrementalDetokenizer, TokenDecoder
from zllm.frontend.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from zllm.protocol.messages import Logprobs, RequestUpdate
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams

_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> TokenDecoder


def token_decoder(tokenizer) -> TokenDecoder | None:
    if tokenizer is None:
        return None
    decoder = _decoders.get(tokenizer)
    if decoder is None:
        decoder = _decoders[tokenizer] = TokenDecoder(tokenizer)
    return decoder


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
        arrival_time: float | None = None,
        lock: threading.RLock | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.index = index
        self.lock = lock or threading.RLock()
        use_text = params.detokenize and tokenizer is not None
        self.detokenizer = (
            IncrementalDetokenizer(
                tokenizer,
                prompt_token_ids,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
            )
            if use_text
            else None
        )
        self.decode_token = token_decoder(tokenizer) if use_text else None
        self.token_ids: list[int] = []
        self.text = ""
        self.sent_text = 0  # chars already sent (DELTA)
        self.sent_tokens = 0  # tokens already sent (DELTA)
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.sent_logprobs = 0
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.prompt_logprobs_sent = False  # DELTA sends them once, in the first output
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.final_sent = False  # DELTA: the finishing piece went out
        self.final_emitted = False  # a finished RequestOutput went out: nothing follows it
        self.num_cached_tokens = 0
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        # Chars that may still be cut by a stop string; never shown before the request ends.
        stops = params.stop or []
        self.stop_buffer = (
            max(len(s) for s in stops) - 1 if stops and not params.include_stop_str_in_output else 0
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def streams(self) -> bool:
        """Whether outputs go out before the end (CUMULATIVE, DELTA): wake its consumer."""
        return self.params.output_kind != RequestOutputKind.FINAL_ONLY

    # ---- input ---------------------------------------------------------------------------------

    def apply(self, update: RequestUpdate, now: float) -> bool:
        """Fold one update in; True if a stop string finished the request here (abort it in
        the engine)."""
        with self.lock:
            if self.finished:
                return False
            return self._apply(update, now)

    def _apply(self, update: RequestUpdate, now: float) -> bool:
        if update.new_token_ids:
            if self.metrics.first_token_time is None:
                self.metrics.first_token_time = now
            self.metrics.last_token_time = now
        self.num_cached_tokens = update.num_cached_tokens
        if update.queue_time is not None:
            self.metrics.time_in_queue = update.queue_time
        if update.prompt_logprobs is not None and self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(self._logprob_dicts(update.prompt_logprobs))
        if update.new_logprobs is not None and self.logprobs is not None:
            entries = self._logprob_dicts(update.new_logprobs)
            self.logprobs.extend(entries)
            for token, entry in zip(update.new_token_ids, entries):
                self.cumulative_logprob += entry[token].logprob
        # A stop token (EOS or stop_token_ids) ends the text without adding its own (vLLM).
        tokens = update.new_token_ids
        skip_last = (
            update.finish_reason == "stop"
            and not isinstance(update.stop_reason, str)
            and not self.params.include_stop_str_in_output
        )
        for i, token in enumerate(tokens):
            self.token_ids.append(token)
            if self.detokenizer is None or (skip_last and i == len(tokens) - 1):
                continue
            before = len(self.text)
            self.text += self.detokenizer.step(token)
            if (
                self.params.stop
                and len(self.token_ids) > self.params.min_tokens
                and self._check_stop_strings(before)
            ):
                self.token_ids.extend(tokens[i + 1 :])
                self.metrics.finished_time = now
                return True
        if update.finish_reason is not None:
            self.finish_reason = update.finish_reason
            self.stop_reason = update.stop_reason
            self.metrics.finished_time = now
        return False

    def _check_stop_strings(self, new_from: int) -> bool:
        """Cut the text at the first stop string (in `stop` order, as vLLM) that ends in the
        text this token added."""
        for stop in self.params.stop:
            at = self.text.find(stop, max(0, new_from - len(stop) + 1))
            if at != -1:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                self.text = self.text[:end]
                self.finish_reason, self.stop_reason = "stop", stop
                return True
        return False

    def abort(self, now: float) -> None:
        """The user aborted: finish with `finish_reason="abort"` (no-op once finished)."""
        with self.lock:
            if not self.finished:
                self.finish_reason, self.stop_reason = "abort", None
                self.metrics.finished_time = now

    def _logprob_dicts(self, lp: Logprobs) -> list[dict[int, Logprob]]:
        """Per position: the chosen token first (with its rank), then the top-k (vLLM's shape)."""
        decode = self.decode_token
        out = []
        for ids, values, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            entry = {ids[0]: Logprob(values[0], rank, decode(ids[0]) if decode else None)}
            for r, (token, value) in enumerate(zip(ids[1:], values[1:]), start=1):
                if token not in entry:
                    entry[token] = Logprob(value, r, decode(token) if decode else None)
            out.append(entry)
        return out

    # ---- output --------------------------------------------------------------------------------

    def completion(self) -> CompletionOutput | None:
        """This completion as its `output_kind` shows it now; None if there is nothing to show."""
        with self.lock:
            kind = self.params.output_kind
            if kind == RequestOutputKind.FINAL_ONLY and not self.finished:
                return None
            visible = len(self.text) if self.finished else len(self.text) - self.stop_buffer
            visible = max(visible, self.sent_text)
            if kind != RequestOutputKind.DELTA:
                text, tokens, logprobs = self.text[:visible], list(self.token_ids), self.logprobs
            else:
                if self.final_sent:
                    return None
                text = self.text[self.sent_text : visible]
                tokens = self.token_ids[self.sent_tokens :]
                logprobs = (
                    self.logprobs[self.sent_logprobs :] if self.logprobs is not None else None
                )
                if not text and not tokens and not self.finished:
                    return None
                self.sent_text, self.sent_tokens = visible, len(self.token_ids)
                self.sent_logprobs = len(self.logprobs) if self.logprobs is not None else 0
                self.final_sent = self.finished
            return CompletionOutput(
                index=self.index,
                text=text,
                token_ids=tokens,
                cumulative_logprob=self.cumulative_logprob,
                logprobs=list(logprobs) if logprobs is not None else None,
                finish_reason=self.finish_reason,
                stop_reason=self.stop_reason,
            )

    def take_prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        """All prompt logprobs; in DELTA mode only the first time (vLLM)."""
        if self.params.output_kind != RequestOutputKind.DELTA:
            return self.prompt_logprobs
        if self.prompt_logprobs_sent:
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs

    def output(self) -> RequestOutput | None:
        """The output to yield now for this request's `output_kind`, or None (nothing new yet,
        or the finished output already went out)."""
        with self.lock:
            if self.final_emitted:
                return None
            completion = self.completion()
            if completion is None:
                return None
            self.final_emitted = self.finished
            return RequestOutput(
                request_id=self.request_id,
                prompt=self.prompt,
                prompt_token_ids=self.prompt_token_ids,
                outputs=[completion],
                finished=self.finished,
                prompt_logprobs=self.take_prompt_logprobs(),
                metrics=self.metrics,
                num_cached_tokens=self.num_cached_tokens,
            )
