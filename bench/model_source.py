"""What a benchmark runs: a named shape with random weights, or a checkpoint directory.

Both engines get the same weights: a shape's are drawn by `load_format="dummy"` in the
engine and by `fill_dummy_` for the transformers peer.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from zllm.bench.shapes import write_shape


@dataclass
class ModelSource:
    path: str
    load_format: str  # "dummy" for a shape, "auto" for a checkpoint
    name: str
    seed: int = 0

    @classmethod
    def from_args(cls, shape: str | None, model: str | None, seed: int = 0) -> ModelSource:
        if (shape is None) == (model is None):
            raise ValueError("give exactly one of --shape and --model")
        if model is not None:
            return cls(model, "auto", model, seed)
        path = write_shape(shape, Path(tempfile.mkdtemp(prefix=f"zllm-{shape}-")))
        return cls(str(path), "dummy", shape, seed)

    def vocab_size(self) -> int:
        from zllm.protocol.config import ModelConfig

        return ModelConfig.from_path(self.path).vocab_size

    def peer_model(self, device: str, dtype: torch.dtype):
        """The transformers model with the engine's weights."""
        import transformers

        from zllm.worker.dummy_weights import fill_dummy_

        if self.load_format == "dummy":
            config = transformers.AutoConfig.from_pretrained(self.path)
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
            fill_dummy_(model, self.seed)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
            model = model.to(device)
        return model.eval()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """The engine's `dtype="auto"`: bf16 on CUDA, float32 on the CPU."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
