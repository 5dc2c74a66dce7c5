"""One client process of a shared daemon: `python daemon_client.py ADDRESS PROMPT...`.

Prints JSON lines: `{"connected": true}`, then (after a line on stdin, so that several
clients start together) the greedy outputs of its prompts, generated concurrently
(`{"outputs": ...}`), then long streams one after another until a second line on stdin:
`{"streaming": true}` once the first one's tokens flow, `{"long_tokens": N, "started": T}`
(`time.monotonic()`) as each ends,
and `{"ok": true, "streams": K}` at the end.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

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


async def main(engine: AsyncLLM, prompts: list[str], stop: threading.Event) -> int:
    outputs = await asyncio.gather(*(final(engine, p, SHORT) for p in prompts))
    print(json.dumps({"outputs": outputs}), flush=True)
    streams = 0
    while not stop.is_set():
        tokens, started = 0, time.monotonic()  # one clock for every process of the host
        async for out in engine.generate(prompts[0], LONG):
            if tokens == 0 and streams == 0:
                print(json.dumps({"streaming": True}), flush=True)
            tokens = len(out.outputs[0].token_ids)
        print(json.dumps({"long_tokens": tokens, "started": started}), flush=True)
        streams += 1
    return streams


if __name__ == "__main__":
    address, prompts = sys.argv[1], sys.argv[2:]
    engine = AsyncLLM(EngineArgs(engine_core_address=address))
    print(json.dumps({"connected": True}), flush=True)
    sys.stdin.readline()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    streams = asyncio.run(main(engine, prompts, stop))
    engine.shutdown()
    print(json.dumps({"ok": True, "streams": streams}), flush=True)
