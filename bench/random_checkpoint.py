"""Random-weight checkpoints of real model shapes written to disk (for what needs files, such
as level-2 sleep re-reading them; `load_format="dummy"` needs none).

python bench/random_checkpoint.py qwen2.5-0.5b /tmp/ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

from zllm.bench.shapes import hf_config


def make_checkpoint(shape: str, out: Path, device: str = "cuda", seed: int = 0):
    """Save a bf16 checkpoint of `shape` with small random weights; return the HF model (the peer)."""
    import torch
    import transformers

    config = hf_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    if not (out / "config.json").exists():
        model.save_pretrained(out)
    return model


if __name__ == "__main__":
    make_checkpoint(sys.argv[1], Path(sys.argv[2]))
