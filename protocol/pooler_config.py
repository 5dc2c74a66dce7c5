"""How a model pools its hidden states into one vector, read from the checkpoint.

A sentence-transformers checkpoint says it in `modules.json` (Transformer -> Pooling ->
Normalize?) and `<pooling dir>/config.json` (which pooling mode); `sentence_bert_config.json`
bounds the sequence length. Without those files an encoder pools its CLS token and a decoder
its last token, normalized (vLLM's defaults). Anything zllm cannot reproduce exactly (a Dense
projection, max pooling, lower-casing) is refused here rather than silently skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

POOLING_TYPES = ("MEAN", "CLS", "LAST")

# sentence-transformers' pooling modes (new `pooling_mode` names and legacy boolean keys)
_ST_MODES = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST"}
_ST_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


class PoolerConfig(msgspec.Struct, kw_only=True):
    pooling_type: str  # "MEAN" | "CLS" | "LAST"
    normalize: bool  # the default when a request leaves `normalize` unset
    is_matryoshka: bool = False  # `dimensions` may truncate the vector
    matryoshka_dimensions: list[int] | None = None  # the only sizes allowed, if the model says


def read_pooler_config(path: Path, raw_config: dict, is_causal: bool) -> PoolerConfig:
    """The pooling a checkpoint asks for (sentence-transformers files, else vLLM's defaults)."""
    dims = raw_config.get("matryoshka_dimensions")
    matryoshka = dict(
        is_matryoshka=bool(raw_config.get("is_matryoshka", False)) or dims is not None,
        matryoshka_dimensions=list(dims) if dims is not None else None,
    )
    modules = _read_json(path / "modules.json")
    if modules is None:
        return PoolerConfig(
            pooling_type="LAST" if is_causal else "CLS", normalize=True, **matryoshka
        )
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    unsupported = [k for k in kinds if k not in _ST_MODULES]
    if unsupported or "Pooling" not in kinds:
        raise ValueError(
            f"{path}/modules.json: zllm runs sentence-transformers models made of Transformer, "
            f"Pooling and Normalize modules; this one has {kinds}"
        )
    pooling_dir = modules[kinds.index("Pooling")].get("path", "")
    pooling = _read_json(path / pooling_dir / "config.json") or {}
    return PoolerConfig(
        pooling_type=_pooling_type(pooling, path / pooling_dir),
        normalize="Normalize" in kinds,
        **matryoshka,
    )


def sentence_transformers_max_len(path: Path) -> int | None:
    """`max_seq_length` of a sentence-transformers checkpoint (it truncates there), or None."""
    config = _read_json(path / "sentence_bert_config.json")
    if config is None:
        return None
    if config.get("do_lower_case"):
        raise ValueError(
            f"{path}/sentence_bert_config.json asks to lower-case the input (do_lower_case); "
            "zllm does not"
        )
    return config.get("max_seq_length")


def _pooling_type(config: dict, where: Path) -> str:
    mode = config.get("pooling_mode")
    if mode is None:  # legacy files: one boolean per mode, mean when none is set
        modes = [name for key, name in _ST_LEGACY_KEYS.items() if config.get(key)] or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in _ST_MODES:
        raise ValueError(
            f"{where}/config.json asks for pooling {modes}; zllm pools one of "
            f"{sorted(_ST_MODES)} (sentence-transformers' names)"
        )
    if config.get("include_prompt") is False:
        raise ValueError(f"{where}/config.json: include_prompt=false is not supported")
    return _ST_MODES[modes[0]]


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None
