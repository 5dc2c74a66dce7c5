"""Which kernels a worker runs: `ZLLM_ATTENTION_BACKEND=torch|triton` (vLLM's
`VLLM_ATTENTION_BACKEND`), by default Triton on CUDA and torch on the CPU.

The choice covers attention and the fused layers (RMSNorm + residual, rotary, SiLU·mul,
greedy argmax): "triton" runs all of them as Triton kernels. On the CPU, "triton" runs
through Triton's interpreter (`TRITON_INTERPRET=1`, for tests only).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from zllm.worker.layers.attention import AttentionBackend, TorchAttentionBackend

ENV_VAR = "ZLLM_ATTENTION_BACKEND"
BACKENDS = ("torch", "triton")

logger = logging.getLogger(__name__)


def attention_backend_name(device: torch.device) -> str:
    asked = os.environ.get(ENV_VAR, "").strip().lower()
    if asked and asked not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={asked!r}: must be one of {', '.join(BACKENDS)}")
    have_triton = importlib.util.find_spec("triton") is not None
    if not asked:
        if device.type == "cuda" and have_triton:
            return "triton"
        if device.type == "cuda":
            logger.warning("triton is not installed: running the torch attention on CUDA")
        return "torch"
    if asked == "triton" and not have_triton:
        raise ValueError(f"{ENV_VAR}=triton needs the triton package (pip install triton)")
    if asked == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{ENV_VAR}=triton on {device.type} needs TRITON_INTERPRET=1 (Triton's interpreter)"
        )
    return asked


def make_attention_backend(
    name: str,
    device: torch.device,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
) -> AttentionBackend:
    """The backend for one rank (`num_heads`, `num_kv_heads`: this rank's share)."""
    if name == "torch":
        return TorchAttentionBackend(block_size, device)
    from zllm.worker.layers.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend(
        device,
        block_size,
        num_heads,
        num_kv_heads,
        head_dim,
        max_num_seqs,
        max_num_batched_tokens,
        max_model_len,
    )
