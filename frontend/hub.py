"""Model names as vLLM takes them: a local directory, or a Hugging Face hub id.

A hub id resolves through `huggingface_hub.snapshot_download`: the local Hugging Face cache
first (`download_dir` or `$HF_HUB_CACHE`), then a download with a progress bar where the
network allows it. With `HF_HUB_OFFLINE=1` only the cache is read. Only the files zllm
uses are fetched (configs, tokenizer, safetensors weights), never pickled weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What zllm reads from a checkpoint: configs, tokenizer files, chat templates, safetensors.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`; anything that starts like a path (/, ./, ~) is a path."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~")) and ".." not in name


def offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or value.upper() in ("1", "ON", "YES", "TRUE")


def snapshot(
    repo_id: str,
    revision: str | None = None,
    download_dir: str | None = None,
    token: str | bool | None = None,
    patterns: list[str] = ALLOW_PATTERNS,
) -> Path:
    """The local folder of `repo_id` at `revision`: from the cache, else downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    kwargs = dict(
        repo_id=repo_id,
        revision=revision,
        cache_dir=download_dir,
        token=token,
        allow_patterns=patterns,
    )
    try:
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except (LocalEntryNotFoundError, IncompleteSnapshotError) as e:
        if offline():
            where = download_dir or "the Hugging Face cache"
            raise FileNotFoundError(
                f"model {repo_id!r} (revision {revision or 'main'}) is not in {where}, and "
                "HF_HUB_OFFLINE=1 forbids downloading it"
            ) from e
    return Path(snapshot_download(**kwargs))
