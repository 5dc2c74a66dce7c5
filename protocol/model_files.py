"""The files a frontend needs besides what `Ready` says: the tokenizer, and the checkpoint's
config and generation defaults (vLLM's `hf_config`, `get_diff_sampling_param`).

engine-core reads them once at start-up and names them in `Ready` by one digest; a client
that cannot read the daemon's filesystem (another host, another user, a path that moved)
fetches them with the utility call "get_model_files", checks the digest and keeps them in a
content-addressed cache, so a second client of the same model fetches nothing.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# What `AutoTokenizer.from_pretrained` may read (whichever exist), from the tokenizer folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
# From the model folder (they win over a tokenizer folder's copies).
CONFIG_FILES = ("config.json", "generation_config.json")
FILE_NAMES = frozenset(TOKENIZER_FILES + CONFIG_FILES)


def read_model_files(model_dir: str, tokenizer_dir: str) -> dict[str, bytes]:
    """name -> content of every such file present."""
    files: dict[str, bytes] = {}
    for folder, names in (
        (tokenizer_dir, TOKENIZER_FILES + CONFIG_FILES),
        (model_dir, CONFIG_FILES),
    ):
        for name in names:
            path = Path(folder) / name
            if path.is_file():
                files[name] = path.read_bytes()
    return files


def digest(files: dict[str, bytes]) -> str:
    """sha256 over the names and contents, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        content = files[name]
        h.update(name.encode() + b"\0" + len(content).to_bytes(8, "little") + content)
    return h.hexdigest()


def is_digest(text: str) -> bool:
    """A client makes a folder of the daemon's digest: it must be one, not a path."""
    return re.fullmatch(r"[0-9a-f]{64}", text) is not None


def check(files: object, expected_digest: str) -> str | None:
    """Why a client must not store the files a daemon sent (None: it may). Only the names
    above, as bytes, with the digest its `Ready` gave: a name like "../.bashrc" would be
    written outside the client's cache."""
    if not isinstance(files, dict):
        return f"a {type(files).__name__}, not a mapping of file names to contents"
    for name, content in files.items():
        if name not in FILE_NAMES:
            return f"an unexpected file name {str(name)[:80]!r}"
        if not isinstance(content, bytes):
            return f"{name}: {type(content).__name__} content, not bytes"
    if digest(files) != expected_digest:
        return f"they do not match the digest of its Ready ({expected_digest[:12]}…)"
    return None
