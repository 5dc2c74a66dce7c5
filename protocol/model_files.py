"""The files a frontend needs besides what `Ready` says: the tokenizer, and the checkpoint's
config and generation defaults (vLLM's `hf_config`, `get_diff_sampling_param`).

engine-core reads them once at start-up and names them in `Ready` by one digest; a client
that cannot read the daemon's filesystem (another host, another user, a path that moved)
fetches them with the utility call "get_model_files", checks the digest and keeps them in a
content-addressed cache, so a second client of the same model fetches nothing.
"""

from __future__ import annotations

import hashlib
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
