"""Sampling parameters: vLLM's names, defaults and validation, as a msgspec Struct.

The same object is validated in the frontend and sent as-is inside `AddRequest`,
so the engine never sees a value the user was not told about.
"""

from __future__ import annotations

import enum
import numbers
import typing
from typing import Any

import msgspec


class RequestOutputKind(enum.IntEnum):
    """What each streamed `RequestOutput` carries."""

    CUMULATIVE = 0  # all text and tokens so far
    DELTA = 1  # only what is new since the last output
    FINAL_ONLY = 2  # one output, when the request finishes


_EPS = 1e-5
_MIN_TEMPERATURE = 1e-2  # vLLM raises smaller positive temperatures to this (inf/nan otherwise)


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True, dict=False):
    """How to sample one request. Raises `ValueError` naming the field on bad values."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # ---- vLLM's later fields (docs/vllm-compat.md)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len)
    bad_words: list[str] | None = None  # never generated, as whole token sequences
    allowed_token_ids: list[int] | None = None  # sample among these only
    extra_args: dict[str, Any] | None = None  # for sampling plugins, which zllm does not have
    _bad_words_token_ids: list[list[int]] | None = None  # set by the frontend from bad_words

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.seed == -1:
            self.seed = None
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        if 0.0 < self.temperature < _MIN_TEMPERATURE:
            self.temperature = _MIN_TEMPERATURE
        if self.greedy:  # as vLLM: the filters mean nothing for argmax
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _verify(self) -> None:
        def bad(field: str, rule: str, value: object) -> ValueError:
            return ValueError(f"SamplingParams.{field} {rule}, got {value!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1", self.n)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise bad(name, "must be in [-2, 2]", value)
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "must be > 0", self.repetition_penalty)
        if not self.temperature >= 0.0:
            raise bad("temperature", "must be >= 0 (0 means greedy)", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be 0 or -1 (off) or a positive integer", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]", self.min_p)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad(
                "max_tokens", "must be >= 1 (or None for up to max_model_len)", self.max_tokens
            )
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens={self.max_tokens}", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < -1):
                raise bad(name, "must be None, -1 (whole vocabulary) or >= 0", value)
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**63):
            raise bad("seed", "must be None or a 64-bit signed integer", self.seed)
        if self.stop_token_ids is not None and any(
            not _is_int(t) or t < 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "must be non-negative token ids", self.stop_token_ids)
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings", self.stop)
        if self.stop and not self.detokenize:
            raise bad("stop", "needs detokenize=True", self.stop)
        if self.logit_bias is not None:
            for token, value in self.logit_bias.items():
                if token < 0:
                    raise bad("logit_bias", "keys must be non-negative token ids", token)
                if not -100.0 <= value <= 100.0:
                    raise bad("logit_bias", "values must be in [-100, 100]", value)
        self._verify_later_fields(bad)

    def _verify_later_fields(self, bad) -> None:
        k = self.truncate_prompt_tokens
        if k is not None and (not _is_int(k) or (k < 1 and k != -1)):
            raise bad("truncate_prompt_tokens", "must be None, -1 (max_model_len) or >= 1", k)
        if self.bad_words is not None and any(
            not isinstance(w, str) or not w.strip() for w in self.bad_words
        ):
            raise bad("bad_words", "must be non-empty strings", self.bad_words)
        allowed = self.allowed_token_ids
        if allowed is not None and (not allowed or any(not _is_int(t) or t < 0 for t in allowed)):
            raise bad("allowed_token_ids", "must be a non-empty list of token ids", allowed)
        if self.extra_args:
            raise NotImplementedError(
                f"SamplingParams.extra_args={self.extra_args!r} is not supported by zllm: they are "
                "read by custom sampling plugins, which zllm does not have"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    def clone(self, **changes: object) -> SamplingParams:
        return msgspec.structs.replace(self, **changes)

    @classmethod
    def from_optional(cls, **kwargs: Any) -> SamplingParams:
        """vLLM's constructor for values that may be None (an OpenAI request's): None means the
        default for a field that cannot be None; `logit_bias` values are clamped to [-100, 100]."""
        nullable = {
            f.name for f in msgspec.structs.fields(cls) if type(None) in typing.get_args(f.type)
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k in nullable}
        if kwargs.get("logit_bias") is not None:
            kwargs["logit_bias"] = {
                int(t): min(100.0, max(-100.0, float(b))) for t, b in kwargs["logit_bias"].items()
            }
        return cls(**kwargs)


def _is_int(value: object) -> bool:
    """An integer, numpy's included (sent as a plain int: see `protocol/admission.py`)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
