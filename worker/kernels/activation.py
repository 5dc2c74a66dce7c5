"""SiLU(gate) * up over the gate_up projection's two halves, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zllm.worker.kernels.common import check_last_dim_contiguous

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    # Rounded where torch rounds: silu's result, then the product.
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (act * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * N] (gate then up) -> [T, N]."""
    check_last_dim_contiguous(x)
    num_rows, width = x.shape
    n = width // 2
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    _silu_and_mul_kernel[(num_rows, triton.cdiv(n, BLOCK))](
        x, out, x.stride(0), out.stride(0), n, BLOCK=BLOCK, num_warps=4
    )
    return out
