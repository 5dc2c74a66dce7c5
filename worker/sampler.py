"""Batched sampling on the device: one pass over `[S, V]` logits for any mix of parameters.

Order (vLLM v1): raw logprobs (before anything touches the logits), min-tokens and
logit-bias, repetition/presence/frequency penalties, greedy argmax, temperature, min-p,
top-k, top-p, then the exponential race (argmax of p / q with q ~ Exp(1)), which needs
one random row per request. Seeded requests draw their row from their own generator, so
their tokens do not depend on what else is in the batch.

Every per-request value is decided on the host and copied to the device without waiting
(pinned, non-blocking), so the caller's copy of the sampled ids is the step's only sync.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from zllm.protocol.sampling_params import SamplingParams
from zllm.worker.transfer import to_device


@dataclass
class SamplingRequest:
    """What the sampler needs of one row."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    eos_token_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S]
    logprobs: torch.Tensor | None = None  # [S, V] log-softmax of the raw logits, when asked


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, fused_argmax: bool = False) -> None:
        self.vocab_size = vocab_size
        self.argmax = _torch_argmax
        if fused_argmax:
            from zllm.worker.kernels.argmax import argmax

            self.argmax = argmax
        self.device = torch.device(device)
        self.to_device = functools.partial(to_device, device=self.device)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRequest]) -> SamplerOutput:
        params = [r.params for r in rows]
        logits = logits.float()
        need_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if need_logprobs else None
        logits = self._apply_masks(logits, rows)
        logits = self._apply_penalties(logits, rows)

        greedy = [p.greedy for p in params]
        if all(greedy):
            return SamplerOutput(self.argmax(logits), raw_logprobs)
        greedy_ids = self.argmax(logits) if any(greedy) else None

        temperature = self.to_device(
            [1.0 if p.greedy else p.temperature for p in params], torch.float32
        )
        logits = logits / temperature.unsqueeze(1)
        logits = self._min_p(logits, params)
        logits = self._top_k(logits, params)
        logits = self._top_p(logits, params)
        sampled = self._random_sample(torch.softmax(logits, dim=-1), rows)
        if greedy_ids is not None:
            sampled = torch.where(self.to_device(greedy, torch.bool), greedy_ids, sampled)
        return SamplerOutput(sampled, raw_logprobs)

    # ---- before temperature (greedy rows see these too) -----------------------------------------

    def _apply_masks(self, logits: torch.Tensor, rows: list[SamplingRequest]) -> torch.Tensor:
        """`allowed_token_ids`, logit bias, then -inf on stop tokens while a request is below
        `min_tokens` and on the last token of each bad word whose other tokens were just generated."""
        logits = self._allowed_only(logits, rows)
        banned_rows: list[int] = []
        banned_cols: list[int] = []
        bias_rows: list[int] = []
        bias_cols: list[int] = []
        bias_vals: list[float] = []
        for i, r in enumerate(rows):
            p = r.params
            for t in _bad_word_endings(p._bad_words_token_ids, r.output_token_ids):
                if t < self.vocab_size:
                    banned_rows.append(i)
                    banned_cols.append(t)
            if len(r.output_token_ids) < p.min_tokens:
                stop_ids = set(p.stop_token_ids or [])
                if not p.ignore_eos:
                    stop_ids |= set(r.eos_token_ids)
                for t in sorted(stop_ids):
                    if t < self.vocab_size:
                        banned_rows.append(i)
                        banned_cols.append(t)
            if p.logit_bias:
                for t, b in p.logit_bias.items():
                    if 0 <= t < self.vocab_size:
                        bias_rows.append(i)
                        bias_cols.append(t)
                        bias_vals.append(b)
        if bias_rows:
            index = (self.to_device(bias_rows, torch.long), self.to_device(bias_cols, torch.long))
            logits = logits.index_put(
                index, self.to_device(bias_vals, torch.float32), accumulate=True
            )
        if banned_rows:
            index = (
                self.to_device(banned_rows, torch.long),
                self.to_device(banned_cols, torch.long),
            )
            banned = torch.full((len(banned_rows),), float("-inf"), device=self.device)
            logits = logits.index_put(index, banned)
        return logits

    def _allowed_only(self, logits: torch.Tensor, rows: list[SamplingRequest]) -> torch.Tensor:
        """-inf everywhere but `allowed_token_ids`, in the rows that set it."""
        limited = [i for i, r in enumerate(rows) if r.params.allowed_token_ids]
        if not limited:
            return logits
        keep_rows: list[int] = []
        keep_cols: list[int] = []
        for j, i in enumerate(limited):
            for t in rows[i].params.allowed_token_ids:
                if t < self.vocab_size:
                    keep_rows.append(j)
                    keep_cols.append(t)
        index = self.to_device(limited, torch.long)
        masked = torch.ones(len(limited), logits.shape[1], dtype=torch.bool, device=self.device)
        keep = (self.to_device(keep_rows, torch.long), self.to_device(keep_cols, torch.long))
        masked.index_put_(keep, torch.zeros((), dtype=torch.bool, device=self.device))
        sub = logits.index_select(0, index).masked_fill(masked, float("-inf"))
        return logits.index_copy(0, index, sub)

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRequest]) -> torch.Tensor:
        """Repetition over prompt + output tokens; frequency and presence over output tokens."""
        params = [r.params for r in rows]
        if not any(
            p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
        ):
            return logits
        s, v = logits.shape
        output_counts = self._counts([r.output_token_ids for r in rows], s, v)
        output_seen = output_counts > 0
        if any(p.repetition_penalty != 1.0 for p in params):
            prompt_seen = self._counts([r.prompt_token_ids for r in rows], s, v) > 0
            rep = self.to_device([p.repetition_penalty for p in params], torch.float32)
            rep = torch.where(prompt_seen | output_seen, rep.unsqueeze(1), 1.0)
            logits = torch.where(logits > 0, logits / rep, logits * rep)
        freq = self.to_device([p.frequency_penalty for p in params], torch.float32).unsqueeze(1)
        pres = self.to_device([p.presence_penalty for p in params], torch.float32).unsqueeze(1)
        return logits - freq * output_counts - pres * output_seen.float()

    def _counts(self, token_lists: list[list[int]], s: int, v: int) -> torch.Tensor:
        """`[S, V]` occurrences of each token id in each row's list."""
        width = max((len(t) for t in token_lists), default=0)
        extended = torch.zeros(s, v + 1, device=self.device)
        if width == 0:
            return extended[:, :v]
        padded = [list(t) + [v] * (width - len(t)) for t in token_lists]  # v: a dropped column
        index = self.to_device(padded, torch.long)
        extended.scatter_add_(1, index, torch.ones_like(index, dtype=extended.dtype))
        return extended[:, :v]

    # ---- random rows only ------------------------------------------------------------------------

    def _min_p(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Drop tokens less likely than `min_p` times the most likely one."""
        if not any(p.min_p > 0 for p in params):
            return logits
        probs = torch.softmax(logits, dim=-1)
        min_p = self.to_device([p.min_p for p in params], torch.float32).unsqueeze(1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p
        return logits.masked_fill(probs < threshold, float("-inf"))

    def _top_k(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Keep the k best of each row; ties with the k-th stay (vLLM)."""
        v = logits.shape[1]
        if not any(0 < p.top_k < v for p in params):
            return logits
        max_k = max(p.top_k for p in params if 0 < p.top_k < v)
        k = self.to_device([p.top_k if 0 < p.top_k < v else max_k for p in params], torch.long)
        kth = logits.topk(max_k, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        off = self.to_device([not 0 < p.top_k < v for p in params], torch.bool).unsqueeze(1)
        return logits.masked_fill((logits < kth) & ~off, float("-inf"))

    def _top_p(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Keep the smallest set of best tokens whose mass reaches p. Only rows that ask are
        sorted (a sort of the vocabulary is the most expensive step here)."""
        rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if not rows:
            return logits
        every_row = len(rows) == len(params)
        index = None if every_row else self.to_device(rows, torch.long)
        sub = logits if index is None else logits.index_select(0, index)
        top_p = self.to_device([params[i].top_p for i in rows], torch.float32).unsqueeze(1)
        sorted_logits, order = sub.sort(dim=-1, descending=False)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1.0 - top_p  # the mass of this token and all worse ones
        remove[:, -1] = False  # the best token always stays
        sub = sub.masked_fill(torch.empty_like(remove).scatter_(1, order, remove), float("-inf"))
        return sub if index is None else logits.index_copy(0, index, sub)

    def _random_sample(self, probs: torch.Tensor, rows: list[SamplingRequest]) -> torch.Tensor:
        """argmax(p / q), q ~ Exp(1): a draw from p. Seeded rows use their own generator."""
        seeded = [(i, r.generator) for i, r in enumerate(rows) if r.generator is not None]
        if any(r.generator is None and not r.params.greedy for r in rows):
            q = torch.empty_like(probs).exponential_()  # seeded rows' are replaced below
        else:  # only seeded (and greedy, whose draw is ignored) rows
            q = torch.ones_like(probs)
        for i, generator in seeded:
            q[i].exponential_(generator=generator)
        # exponential_ may return exactly 0; keep p / q finite for zero-probability tokens.
        return (probs / q.clamp_(min=torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def _bad_word_endings(bad_words: list[list[int]] | None, output: list[int]) -> list[int]:
    """The last token of every bad word whose earlier tokens end the output so far (vLLM
    matches against generated tokens only)."""
    endings = []
    for word in bad_words or ():
        prefix = word[:-1]
        if not prefix or (len(prefix) <= len(output) and output[-len(prefix) :] == prefix):
            endings.append(word[-1])
    return endings


def _torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row argmax (the first of equal maxima). On the CPU numpy's vectorised argmax is ~5x
    faster than torch's for `[S, V]` logits, with the same result."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.contiguous().numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row: the given token's logprob and rank (1 = best, ties counted as vLLM),
    then the k best; as `[R, 1 + k]` ids and logprobs and `[R]` ranks, still on the device."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs >= chosen).sum(dim=-1)
    if k > 0:
        top = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
        ids = torch.cat([token_ids.unsqueeze(1), top.indices], dim=1)
        values = torch.cat([chosen, top.values], dim=1)
    else:
        ids, values = token_ids.unsqueeze(1), chosen
    return ids, values, ranks
