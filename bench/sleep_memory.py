"""Device memory held by the engine before, during and after sleep mode (CUDA).

    python bench/sleep_memory.py --shape qwen2.5-0.5b

Memory is read with `torch.cuda.mem_get_info()` in this (frontend) process: used memory on
the device minus what was used before the engine started, so it counts every engine process.
Also checks that greedy outputs after `wake_up()` equal those before `sleep()`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from random_checkpoint import make_checkpoint  # noqa: E402


def used_bytes() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def main() -> None:
    from zllm import LLM, SamplingParams

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp(prefix="zllm-sleep-"))
    model = make_checkpoint(args.shape, path)
    del model
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    baseline = used_bytes()
    prompts = [{"prompt_token_ids": list(range(10 + i, 60 + i))} for i in range(4)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, detokenize=False)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype=args.dtype)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    llm.reset_prefix_cache()
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    print(json.dumps({"repeat_without_sleep_equal": again == before}), flush=True)
    awake = used_bytes() - baseline
    rows = []
    for level in (1, 2):
        start = time.perf_counter()
        llm.sleep(level=level)
        sleep_s = time.perf_counter() - start
        time.sleep(1)
        asleep = used_bytes() - baseline
        start = time.perf_counter()
        llm.wake_up()
        wake_s = time.perf_counter() - start
        after = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        rows.append(
            {
                "shape": args.shape,
                "dtype": args.dtype,
                "level": level,
                "awake_gib": round(awake / 2**30, 3),
                "asleep_gib": round(asleep / 2**30, 3),
                "freed_pct": round(100 * (1 - asleep / awake), 2),
                "sleep_s": round(sleep_s, 3),
                "wake_s": round(wake_s, 3),
                "outputs_equal": after == before,
                "first_divergence": [
                    next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                    for a, b in zip(after, before)
                ],
            }
        )
    llm.shutdown()
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
