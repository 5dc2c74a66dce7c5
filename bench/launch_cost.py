"""Host time to launch one kernel from Python (no waiting for the GPU): the Triton GEMV and
argmax against cuBLAS and torch's argmax, at batch 1 of the Qwen2.5-0.5B LM head.

    python bench/launch_cost.py
"""

from __future__ import annotations

import json
import time

import torch

from zllm.worker.kernels.argmax import argmax
from zllm.worker.kernels.gemv import gemv


def host_us(fn, calls: int = 2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return round(1e6 * seconds / calls, 2)


def main() -> None:
    x = torch.randn(1, 896, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(1152, 896, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(1, 151936, device="cuda")
    print(
        json.dumps(
            {
                "gemv_us": host_us(lambda: gemv(x, w)),
                "cublas_linear_us": host_us(lambda: torch.nn.functional.linear(x, w)),
                "triton_argmax_us": host_us(lambda: argmax(logits)),
                "torch_argmax_us": host_us(lambda: logits.argmax(dim=-1)),
            }
        )
    )


if __name__ == "__main__":
    main()
