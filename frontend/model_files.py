"""A daemon's tokenizer and config files, on this machine (see `protocol/model_files.py`).

The daemon's `Ready` names its files by digest; they are fetched once (the utility call
"get_model_files"), checked against the digest and kept under `$ZLLM_ENGINE_FILES/<digest>/`
(default `$ZLLM_CACHE/engine-files`), so the client needs nothing of the daemon's filesystem
and the next client of the same model reads them from there.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

from zllm.frontend.engine_client import EngineClient
from zllm.frontend.errors import EngineStartupError
from zllm.protocol import model_files
from zllm.protocol.config import cache_dir

FETCH_TIMEOUT_S = 120.0
_COMPLETE = ".complete"


def local_model_files(client: EngineClient) -> Path:
    """The folder holding the daemon's files, fetched if this machine has no copy yet."""
    digest = client.ready.model_files_digest
    if not model_files.is_digest(digest):
        raise EngineStartupError(f"engine-core's Ready names no sha256 digest: {digest[:80]!r}")
    folder = Path(os.environ.get("ZLLM_ENGINE_FILES") or cache_dir() / "engine-files") / digest
    if (folder / _COMPLETE).is_file():
        return folder
    files = client.call("get_model_files").result(timeout=FETCH_TIMEOUT_S)
    problem = model_files.check(files, digest)
    if problem is not None:
        raise EngineStartupError(f"refused the model files engine-core sent: {problem}")
    try:
        return _store(files, folder)
    except OSError:  # no writable cache: a private folder for this process
        return _store(files, Path(_private_dir()) / digest)


def _store(files: dict[str, bytes], folder: Path) -> Path:
    """Write into a fresh folder, then rename it into place (another client may race us)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=folder.parent))
    try:
        for name, content in files.items():
            (staging / name).write_bytes(content)
        (staging / _COMPLETE).write_text("")
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@functools.cache
def _private_dir() -> str:
    directory = tempfile.mkdtemp(prefix="zllm-engine-files-")
    atexit.register(shutil.rmtree, directory, True)
    return directory
