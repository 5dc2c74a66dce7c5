"""One client process of a shared daemon: `python daemon_client.py ADDRESS PROMPT...`.

Prints JSON lines: `{"connected": true}`, then (after a line on stdin, so that several
clients start together) the greedy outputs of its prompts, generated concurrently
(`{"outputs": ...}`), then, while a long stream runs, `{"streaming": true}` once tokens flow
and `{"ok": ..., "long_tokens": N}` when it ends.
"""

from __future__ import annotations

import asyncio
import json
import sys

from zllm import AsyncLLM, EngineArgs, SamplingParams

SHORT = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)


async def final(engine: AsyncLLM, prompt: str, params: SamplingParams) -> dict:
    out = None
    async for output in engine.generate(prompt, params):
        out = output
    return {
        "prompt": prompt,
        "prompt_token_ids": out.prompt_token_ids,
        "token_ids": out.outputs[0].token_ids,
        "text": out.outputs[0].text,
    }


async def main(engine: AsyncLLM, prompts: list[str]) -> int:
    outputs = await asyncio.gather(*(final(engine, p, SHORT) for p in prompts))
    print(json.dumps({"outputs": outputs}), flush=True)
    tokens = 0
    async for out in engine.generate(prompts[0], LONG):
        if tokens == 0:
            print(json.dumps({"streaming": True}), flush=True)
        tokens = len(out.outputs[0].token_ids)
    return tokens


if __name__ == "__main__":
    address, prompts = sys.argv[1], sys.argv[2:]
    engine = AsyncLLM(EngineArgs(engine_core_address=address))
    print(json.dumps({"connected": True}), flush=True)
    sys.stdin.readline()
    tokens = asyncio.run(main(engine, prompts))
    engine.shutdown()
    print(json.dumps({"ok": True, "long_tokens": tokens}), flush=True)
