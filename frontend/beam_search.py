"""`LLM.beam_search`, as vLLM defines it, on the engine's logprobs.

Each step asks the engine for one token per live beam with the top `2 * beam_width` logprobs
(as Hugging Face does), extends every beam by each candidate, and keeps the `beam_width`
best by score = cumulative logprob / length ** length_penalty (length counts the prompt, and
not a final EOS, as in vLLM). A beam that emits EOS is complete; so is one that reaches
max_model_len. The prefix cache keeps each step from recomputing the shared prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from zllm.frontend.outputs import Logprob
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams


class BeamSearchParams(msgspec.Struct, omit_defaults=True):
    """vLLM's beam search parameters."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BeamSearchParams.{name} must be an integer >= 1, got {value!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"BeamSearchParams.temperature must be >= 0, got {self.temperature}")


@dataclass
class BeamSearchSequence:
    """One beam: prompt + generated tokens, a logprob dict per generated token, its text once
    returned. `finish_reason` is "stop" (EOS) or "length"."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: None = None


@dataclass
class BeamSearchOutput:
    """The best `beam_width` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_search_score(
    tokens: list[int], cum_logprob: float, eos_token_ids: set[int], length_penalty: float
) -> float:
    length = len(tokens) - (1 if tokens[-1] in eos_token_ids else 0)
    return cum_logprob / (length**length_penalty)


def beam_search(
    generate: Callable[[list[dict], SamplingParams], list],
    prompt_token_ids: Sequence[list[int]],
    params: BeamSearchParams,
    eos_token_ids: set[int],
    max_model_len: int,
    tokenizer,
    on_step: Callable[[], None] | None = None,
) -> list[BeamSearchOutput]:
    """`generate(token_prompts, sampling_params)` is `LLM.generate` (outputs in input order)."""
    step_params = SamplingParams(
        logprobs=2 * params.beam_width,
        max_tokens=1,
        temperature=params.temperature,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )

    def score(beam: BeamSearchSequence) -> float:
        return beam_search_score(
            beam.tokens, beam.cum_logprob, eos_token_ids, params.length_penalty
        )

    live = [[BeamSearchSequence(tokens=list(ids))] for ids in prompt_token_ids]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompt_token_ids]
    for _ in range(params.max_tokens):
        for beams, finished in zip(live, done):  # no room for another token: complete
            for beam in [b for b in beams if len(b.tokens) >= max_model_len]:
                beam.finish_reason = "length"
                finished.append(beam)
                beams.remove(beam)
        batch = [beam for beams in live for beam in beams]
        if not batch:
            break
        outputs = iter(generate([{"prompt_token_ids": b.tokens} for b in batch], step_params))
        for i, beams in enumerate(live):
            candidates = []
            for beam in beams:
                top = next(outputs).outputs[0].logprobs[0]
                for token, logprob in top.items():
                    new = BeamSearchSequence(
                        tokens=beam.tokens + [token],
                        logprobs=beam.logprobs + [top],
                        cum_logprob=beam.cum_logprob + logprob.logprob,
                    )
                    if token in eos_token_ids and not params.ignore_eos:
                        new.finish_reason, new.stop_reason = "stop", None
                        done[i].append(new)
                    else:
                        candidates.append(new)
            live[i] = sorted(candidates, key=score, reverse=True)[: params.beam_width]
        if on_step is not None:
            on_step()

    results = []
    for beams, finished in zip(live, done):
        for beam in beams:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(finished + beams, key=score, reverse=True)[: params.beam_width]
        for beam in best:
            tokens = beam.tokens
            if beam.finish_reason == "stop" and not params.include_stop_str_in_output:
                tokens = tokens[:-1]
            beam.text = tokenizer.decode(tokens)
        results.append(BeamSearchOutput(sequences=best))
    return results
