"""RMSNorm, optionally fused with the residual add before it (one read, one write per row).

Rounding follows the torch layer exactly: the residual sum is rounded to the model dtype,
the norm is computed in float32, rounded, then multiplied by the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zllm.worker.kernels.common import block, check_last_dim_contiguous


@triton.jit
def _rms_norm_kernel(
    X,
    Residual,
    W,
    Out,
    stride_x,
    stride_r,
    stride_o,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(Residual.dtype.element_ty)
        tl.store(Residual + row * stride_r + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    normed = (x * rstd).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (normed * w).to(Out.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalise the last dim of `x`. With `residual`: `residual += x` in place first, and the
    sum is what gets normalised (the pre-norm residual stream of a decoder layer)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    check_last_dim_contiguous(x2)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r2 = x2
    if residual is not None:
        r2 = residual.view(-1, shape[-1])
        check_last_dim_contiguous(r2)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        r2,
        weight,
        out,
        x2.stride(0),
        r2.stride(0),
        out.stride(0),
        shape[-1],
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block(shape[-1]),
        num_warps=4 if shape[-1] <= 4096 else 8,
    )
    return out.view(shape)
