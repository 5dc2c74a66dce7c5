"""A non-streamed answer built from the engine's DELTA outputs: per prompt, its n completions
with their text, token ids, logprobs and finish reasons (the server always consumes deltas,
so its metrics see every token as it comes)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from zllm.frontend.outputs import CompletionOutput, RequestOutput


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, completion: CompletionOutput) -> None:
        self.text += completion.text
        self.token_ids += completion.token_ids
        if completion.logprobs is not None:
            self.logprobs = (self.logprobs or []) + completion.logprobs
        self.cumulative_logprob = completion.cumulative_logprob
        self.finish_reason = completion.finish_reason
        self.stop_reason = completion.stop_reason


@dataclass
class PromptResult:
    prompt: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list | None = None
    choices: list[Choice] = field(default_factory=list)


async def gather(
    outputs: AsyncIterator[tuple[int, RequestOutput]], num_prompts: int, n: int
) -> list[PromptResult]:
    async with contextlib.aclosing(outputs):  # leaving early aborts the request now
        results = [PromptResult(choices=[Choice() for _ in range(n)]) for _ in range(num_prompts)]
        async for index, output in outputs:
            result = results[index]
            result.prompt, result.prompt_token_ids = output.prompt, output.prompt_token_ids
            if output.prompt_logprobs is not None:
                result.prompt_logprobs = output.prompt_logprobs
            for completion in output.outputs:
                result.choices[completion.index].add(completion)
        return results


def prompt_text(prompt: str | None, prompt_token_ids: list[int], tokenizer) -> str:
    """The prompt as text (echo): as given, or its token ids decoded."""
    if prompt is not None:
        return prompt
    return tokenizer.decode(prompt_token_ids) if tokenizer is not None else ""
