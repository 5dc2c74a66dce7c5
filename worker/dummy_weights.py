"""Random weights for `load_format="dummy"`: benchmarks of real shapes without checkpoint files.

The weights are those of a Hugging Face checkpoint of the config (its tensor names and
shapes, listed by transformers on the meta device), each drawn on the device from a
generator seeded by the engine seed and the tensor's name. They go through the model's
normal `load_weight` path, so tensor-parallel slicing and the completeness check apply,
and a transformers model of the same config filled with `fill_dummy_` holds the very same
weights (the benchmark's peer, and the test that dummy weights are built right).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch

from zllm.protocol.config import ModelConfig

STD = 0.02


def dummy_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int
) -> torch.Tensor:
    """Norm weights are ones; everything else is N(0, STD), drawn in float32 then cast."""
    device = torch.device(device)
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=dtype, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.empty(shape, dtype=torch.float32, device=device)
    return values.normal_(0.0, STD, generator=generator).to(dtype)


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a transformers checkpoint of `config.path` holds."""
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(config.path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def dummy_weights(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in checkpoint_shapes(config).items():
        yield name, dummy_tensor(name, shape, dtype, device, seed)


@torch.no_grad()
def fill_dummy_(model: torch.nn.Module, seed: int) -> None:
    """Give a transformers model the weights `load_format="dummy"` builds for its config."""
    for name, param in model.named_parameters():
        param.copy_(dummy_tensor(name, tuple(param.shape), param.dtype, param.device, seed))
