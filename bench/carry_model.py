"""Copy a checkpoint small enough to carry to the GPU machine, which cannot download one.

    python bench/carry_model.py                      # the default embedding model
    python bench/carry_model.py --model DIR --name NAME

Writes `.models/NAME` (ignored by git): the checkpoint's files, its safetensors cast to
bfloat16 (half the bytes; the GPU benchmarks run in bfloat16, so both engines load the same
weights they would have rounded anyway). `bench/gpu_check.sh embed` reads it there.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def carry(source: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    for path in source.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            save_file(
                {
                    k: v.to(torch.bfloat16) if v.is_floating_point() else v
                    for k, v in tensors.items()
                },
                target,
                metadata={"format": "pt"},
            )
        else:
            shutil.copy2(path, target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a checkpoint dir (default: all-MiniLM-L6-v2)")
    parser.add_argument("--name", default="all-minilm-l6-v2")
    args = parser.parse_args()
    if args.model:
        source = Path(args.model)
    else:
        from zllm.frontend.default_embedding_model import download_default_embedding

        source = download_default_embedding()
    out = carry(source, Path(__file__).resolve().parent.parent / ".models" / args.name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
