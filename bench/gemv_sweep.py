"""Batch-1 projections: `worker/kernels/gemv.py` against `torch.nn.functional.linear`
(cuBLAS), per shape and per kernel configuration, on a GPU.

    python bench/gemv_sweep.py --shapes llama-3.1-8b qwen2.5-0.5b

Each projection is timed as a decode step meets it: many copies of the weight (more bytes
than the L2 cache holds) multiplied one after the other inside a CUDA graph, so no launch
gaps and no cache hits flatter either side. Prints one JSON line per shape: microseconds per
call and GB/s of weight read for cuBLAS and for each configuration, best first.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from zllm.bench.shapes import SHAPES
from zllm.worker.kernels.gemv import GemvConfig, gemv

L2_BYTES = 256 << 20  # read more than this per graph: well past any L2


def projections(shape: str) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of each projection of the shape, at tensor_parallel_size 1."""
    c = SHAPES[shape]
    hidden, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim", hidden // heads)
    inter = c["intermediate_size"]
    return {
        "qkv": ((heads + 2 * kv) * head_dim, hidden),
        "o": (hidden, heads * head_dim),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
        "lm_head": (c["vocab_size"], hidden),
    }


def time_us(fn, weights: list[torch.Tensor]) -> float:
    """Microseconds per call of `fn(w)` over `weights`, replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in weights:
            fn(w)  # compile / tune outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = 10
    start.record()
    for _ in range(runs):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (runs * len(weights))


def configs() -> list[GemvConfig]:
    out = []
    for bn, bk, warps, stages in itertools.product(
        (4, 8, 16, 32), (256, 512, 1024), (4, 8), (3, 4)
    ):
        if bn * bk // (32 * warps) in range(8, 129):  # fp32 accumulators per thread
            out.append(GemvConfig(bn, bk, warps, stages))
    return out


def sweep(name: str, n: int, k: int, dtype: torch.dtype) -> dict:
    x = torch.randn(1, k, dtype=dtype, device="cuda")
    copies = max(4, -(-L2_BYTES // (n * k * dtype.itemsize)))
    weights = [torch.randn(n, k, dtype=dtype, device="cuda") * 0.02 for _ in range(copies)]
    bytes_per_call = n * k * dtype.itemsize
    ref = torch.nn.functional.linear(x, weights[0]).float()
    cublas = time_us(lambda w: torch.nn.functional.linear(x, w), weights)
    rows = []
    for cfg in configs():
        try:
            err = (gemv(x, weights[0], None, cfg).float() - ref).abs().max().item()
            us = time_us(lambda w, cfg=cfg: gemv(x, w, None, cfg), weights)
        except Exception as exc:  # a configuration the compiler refuses: skip it
            rows.append({"config": list(cfg), "error": str(exc)[:100]})
            continue
        rows.append({"config": list(cfg), "us": round(us, 2), "max_err": err})
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    for r in ok:
        r["gb_s"] = round(bytes_per_call / r["us"] / 1e3, 1)
    return {
        "projection": name,
        "n": n,
        "k": k,
        "cublas_us": round(cublas, 2),
        "cublas_gb_s": round(bytes_per_call / cublas / 1e3, 1),
        "best": ok[:8],
        "failed": len(rows) - len(ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-3.1-8b", "qwen2.5-0.5b"])
    parser.add_argument("--dtype", default="bfloat16")
    ns = parser.parse_args()
    dtype = getattr(torch, ns.dtype)
    for shape in ns.shapes:
        for name, (n, k) in projections(shape).items():
            print(json.dumps({"shape": shape, **sweep(name, n, k, dtype)}), flush=True)


if __name__ == "__main__":
    main()
