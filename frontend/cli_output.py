"""How `zllm generate` prints what it cannot stream: several completions (`--n`), token ids
(`--no-detokenize`), logprobs (`--logprobs`, `--prompt-logprobs`)."""

from __future__ import annotations

from typing import TextIO

from zllm.frontend.outputs import Logprob, RequestOutput


async def final_output(engine, prompt, params) -> RequestOutput:
    last = None
    async for output in engine.generate(prompt, params):
        last = output
    assert last is not None
    return last


def print_output(output: RequestOutput, out: TextIO) -> None:
    for completion in output.outputs:
        if len(output.outputs) > 1:
            out.write(f"--- completion {completion.index} ---\n")
        text = completion.text if completion.text or not completion.token_ids else None
        out.write((text if text is not None else " ".join(map(str, completion.token_ids))) + "\n")
        if completion.logprobs is not None:
            out.write("logprobs (token, logprob, alternatives):\n")
            _print_logprobs(completion.token_ids, completion.logprobs, out)
    if output.prompt_logprobs is not None:
        out.write("prompt logprobs (token, logprob, alternatives):\n")
        # the first prompt token has none (nothing predicts it)
        _print_logprobs(output.prompt_token_ids[1:], output.prompt_logprobs[1:], out)


def _print_logprobs(tokens: list[int], entries: list[dict[int, Logprob] | None], out: TextIO):
    for token, entry in zip(tokens, entries):
        if entry is None:
            continue
        chosen = entry[token]
        others = ", ".join(
            f"{_label(t, lp)} {lp.logprob:.3f}" for t, lp in entry.items() if t != token
        )
        out.write(f"  {_label(token, chosen)}\t{chosen.logprob:.4f}\t{others}\n")


def _label(token: int, logprob: Logprob) -> str:
    return repr(logprob.decoded_token) if logprob.decoded_token is not None else str(token)
