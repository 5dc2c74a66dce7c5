"""Offline generation throughput: zllm's `LLM.generate` against transformers `generate`, same
weights, same prompts, same lengths, in one run.

    python bench/throughput.py --shape qwen2.5-0.5b --num-prompts 64 --input-len 256 --output-len 256

Prints one JSON line per measurement (engine, workload, output tok/s, total tok/s).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from random_checkpoint import make_checkpoint  # noqa: E402


def run_zllm(path: str, prompts: list[list[int]], output_len: int, **engine_kwargs) -> dict:
    from zllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(path, skip_tokenizer_init=True, **engine_kwargs)
    load_s = time.perf_counter() - start
    params = SamplingParams(
        max_tokens=output_len, temperature=0.0, ignore_eos=True, detokenize=False
    )
    llm.generate(
        [{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4, detokenize=False)
    )  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.shutdown()
    return {
        "engine": "zllm",
        "seconds": elapsed,
        "generated": generated,
        "load_s": load_s,
        "first_tokens": outputs[0].outputs[0].token_ids[:8],
    }


def run_transformers(model, prompts: list[list[int]], output_len: int, batch_size: int) -> dict:
    import torch

    generated = 0
    first = None
    torch.cuda.synchronize()
    model.generate(
        torch.tensor([prompts[0]], device="cuda"), max_new_tokens=4, do_sample=False
    )  # warm-up
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = torch.tensor(prompts[i : i + batch_size], device="cuda")
        out = model.generate(
            batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
        generated += (out.shape[1] - batch.shape[1]) * batch.shape[0]
        if first is None:
            first = out[0, batch.shape[1] : batch.shape[1] + 8].tolist()
    torch.cuda.synchronize()
    return {
        "engine": "transformers",
        "seconds": time.perf_counter() - start,
        "generated": generated,
        "first_tokens": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--peer-batch",
        type=int,
        default=0,
        help="transformers batch size (0: all prompts); -1: skip peer",
    )
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    args = parser.parse_args()

    import torch

    path = Path(args.checkpoint or tempfile.mkdtemp(prefix=f"zllm-{args.shape}-"))
    model = make_checkpoint(args.shape, path)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 1000, (args.num_prompts, args.input_len), generator=g).tolist()
    workload = {
        "shape": args.shape,
        "prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
    }
    results = []
    if args.peer_batch >= 0:
        peer = run_transformers(
            model, prompts, args.output_len, args.peer_batch or args.num_prompts
        )
        results.append(peer)
    del model
    torch.cuda.empty_cache()
    results.append(run_zllm(str(path), prompts, args.output_len, max_num_seqs=args.max_num_seqs))
    for r in results:
        r.update(workload)
        r["output_tok_s"] = round(r["generated"] / r["seconds"], 1)
        r["total_tok_s"] = round(
            (r["generated"] + args.num_prompts * args.input_len) / r["seconds"], 1
        )
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
