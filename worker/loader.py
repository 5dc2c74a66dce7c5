"""Build a model and fill it from a Hugging Face safetensors checkpoint (sharded or not), or
with random weights (`load_format="dummy"`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from zllm.protocol.config import ModelConfig
from zllm.worker.checkpoint_tensor import CheckpointTensor
from zllm.worker.dummy_weights import dummy_weights
from zllm.worker.models import Model, model_class


def checkpoint_files(path: str) -> list[Path]:
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {path!r}")
    return files


def safetensors_weights(
    path: str, device: torch.device, dtype: torch.dtype, progress: bool
) -> Iterator[tuple[str, CheckpointTensor]]:
    """Each tensor of the checkpoint (mmap'd, one at a time), read when its consumer asks for
    it (a tensor-parallel rank: only its slice), to `device` in `dtype`."""
    files = checkpoint_files(path)
    with tqdm(
        total=len(files), desc="Loading safetensors", unit="file", disable=not progress
    ) as bar:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, CheckpointTensor.from_safetensors(f, name, device, dtype)
            bar.update(1)


def load_model(
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    load_format: str = "auto",
    kernels: str = "torch",
    seed: int = 0,
) -> Model:
    """Allocate the model on `device` in `dtype`, then copy each tensor in.

    `load_format`: "auto" / "safetensors" read the checkpoint; "dummy" draws random weights
    on the device (`worker/dummy_weights.py`). `kernels`: "torch" or "triton" (fused layers).
    """
    cls = model_class(config.architecture)
    if cls.is_causal != config.is_causal:  # the engine schedules by `config.is_causal`
        raise ValueError(
            f"{config.architecture}: the engine thinks is_causal={config.is_causal}, "
            f"its model class {cls.__name__} says {cls.is_causal}"
        )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config, kernels=kernels)
    finally:
        torch.set_default_dtype(previous)
    expected: set[str] = set()
    for name, _ in model.named_parameters():
        parts = len(getattr(model.get_submodule(name.rsplit(".", 1)[0]), "local_sizes", [0]))
        expected |= {name} | {f"{name}#{i}" for i in range(1, parts)}  # stacked q/k/v, gate/up
    if load_format == "dummy":
        weights = (
            (name, CheckpointTensor.of(t)) for name, t in dummy_weights(config, device, dtype, seed)
        )
    else:
        weights = safetensors_weights(config.path, device, dtype, progress)
    loaded: set[str] = set()
    for name, tensor in weights:
        target = model.load_weight(name, tensor)
        if target is not None:
            loaded.add(target)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {config.path!r} lacks weights for: {', '.join(missing[:8])}")
    return model.eval()
