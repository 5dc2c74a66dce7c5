"""Random-token prompts of fixed or ranged lengths, the same for zllm and its peer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def parse_length(text: str) -> tuple[int, int]:
    """ "128" -> (128, 128); "32:128" -> (32, 128), both ends included."""
    lo, _, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"length {text!r} is not N or LOW:HIGH") from None
    if not 1 <= low <= high:
        raise ValueError(f"length {text!r} needs 1 <= LOW <= HIGH")
    return low, high


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    def describe(self) -> dict:
        return {
            "requests": len(self.prompts),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "input_len": [min(map(len, self.prompts)), max(map(len, self.prompts))],
            "output_len": [min(self.output_lens), max(self.output_lens)],
        }


def random_workload(
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    vocab_size: int,
    seed: int = 0,
) -> Workload:
    g = torch.Generator().manual_seed(seed)

    def lengths(bounds: tuple[int, int]) -> list[int]:
        return torch.randint(bounds[0], bounds[1] + 1, (num_prompts,), generator=g).tolist()

    high = min(vocab_size, 30000)  # clear of any special ids at the top of a vocabulary
    prompts = [torch.randint(10, high, (n,), generator=g).tolist() for n in lengths(input_len)]
    return Workload(prompts, lengths(output_len))
