"""Small helpers shared by the kernel launchers."""

from __future__ import annotations

import os

import torch
import triton


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee"); Hopper would otherwise round them to tf32
    and break float32 parity. bf16/fp16 inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting() -> bool:
    """True under Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bf16 `tl.dot` operands as raw bits (wrong results), so
    the attention kernels upcast them to fp32 there, after the same rounding to bf16 the
    GPU path does. On a GPU the operands stay bf16 (tensor cores)."""
    return dtype == torch.bfloat16 and interpreting()


def block(n: int, minimum: int = 1) -> int:
    """The power-of-two block that covers `n` (Triton block shapes must be powers of two)."""
    return max(minimum, triton.next_power_of_2(n))


def check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"kernel input of shape {tuple(t.shape)} needs a contiguous last dim")
