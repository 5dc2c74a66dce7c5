"""Batched sampling on the device: one pass over `[S, V]` logits for any mix of parameters.

Order (as vLLM): min-tokens and logit-bias masks, repetition/presence/frequency penalties,
temperature, top-k, top-p, min-p, then sampling by the exponential race
(argmax of p / q with q ~ Exp(1)), which needs one random row per request. Seeded requests
draw their row from their own generator, so their tokens do not depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zllm.protocol.sampling_params import SamplingParams


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
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRequest]) -> SamplerOutput:
        logits = logits.float()
        need_logprobs = any(r.params.logprobs is not None for r in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if need_logprobs else None
        logits = self._apply_masks(logits, rows)
        logits = self._apply_penalties(logits, rows)

        params = [r.params for r in rows]
        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        greedy_ids = logits.argmax(dim=-1)
        if bool(greedy.all()):
            return SamplerOutput(greedy_ids, raw_logprobs)

        temperature = torch.tensor(
            [p.temperature if not p.greedy else 1.0 for p in params], device=self.device
        )
        logits = logits / temperature.unsqueeze(1)
        logits = self._top_k_top_p(logits, params)
        probs = torch.softmax(logits, dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=self.device)
            threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        q = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if len(unseeded) == len(rows):
            q.exponential_()
        else:
            if unseeded:
                q[unseeded] = torch.empty_like(q[unseeded]).exponential_()
            for i, r in enumerate(rows):
                if r.generator is not None:
                    q[i].exponential_(generator=r.generator)
        sampled = (probs / q).argmax(dim=-1)
        return SamplerOutput(torch.where(greedy, greedy_ids, sampled), raw_logprobs)

    def _apply_masks(self, logits: torch.Tensor, rows: list[SamplingRequest]) -> torch.Tensor:
        banned_rows: list[int] = []
        banned_cols: list[int] = []
        bias_rows: list[int] = []
        bias_cols: list[int] = []
        bias_vals: list[float] = []
        for i, r in enumerate(rows):
            p = r.params
            if len(r.output_token_ids) < p.min_tokens:
                stop_ids = set(p.stop_token_ids or [])
                if not p.ignore_eos:
                    stop_ids |= set(r.eos_token_ids)
                for t in stop_ids:
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
            logits = logits.index_put(
                (
                    torch.tensor(bias_rows, device=self.device),
                    torch.tensor(bias_cols, device=self.device),
                ),
                torch.tensor(bias_vals, device=self.device),
                accumulate=True,
            )
        if banned_rows:
            logits = logits.index_put(
                (
                    torch.tensor(banned_rows, device=self.device),
                    torch.tensor(banned_cols, device=self.device),
                ),
                torch.tensor(float("-inf"), device=self.device),
            )
        return logits

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRequest]) -> torch.Tensor:
        params = [r.params for r in rows]
        if not any(
            p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
        ):
            return logits
        s, v = logits.shape
        output_counts = self._counts([r.output_token_ids for r in rows], s, v)
        prompt_seen = self._counts([r.prompt_token_ids for r in rows], s, v) > 0
        rep = torch.tensor([p.repetition_penalty for p in params], device=self.device).unsqueeze(1)
        seen = prompt_seen | (output_counts > 0)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        freq = torch.tensor([p.frequency_penalty for p in params], device=self.device).unsqueeze(1)
        pres = torch.tensor([p.presence_penalty for p in params], device=self.device).unsqueeze(1)
        return logits - freq * output_counts - pres * (output_counts > 0).float()

    def _counts(self, token_lists: list[list[int]], s: int, v: int) -> torch.Tensor:
        counts = torch.zeros(s, v, device=self.device)
        width = max((len(t) for t in token_lists), default=0)
        if width == 0:
            return counts
        padded = torch.full((s, width), v, dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            padded[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        padded = padded.to(self.device)
        extended = torch.zeros(s, v + 1, device=self.device)
        extended.scatter_add_(1, padded, torch.ones_like(padded, dtype=extended.dtype))
        return extended[:, :v]

    def _top_k_top_p(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        use_k = any(p.top_k > 0 for p in params)
        use_p = any(p.top_p < 1.0 for p in params)
        if not (use_k or use_p):
            return logits
        v = logits.shape[1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if use_k:
            k = torch.tensor([p.top_k if p.top_k > 0 else v for p in params], device=self.device)
            remove |= torch.arange(v, device=self.device).unsqueeze(0) >= k.clamp(max=v).unsqueeze(
                1
            )
        if use_p:
            top_p = torch.tensor([p.top_p for p in params], device=self.device).unsqueeze(1)
            probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
            remove |= before >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
