"""Pooling parameters (`encode()` / `embed()`): vLLM's names and validation, as a msgspec Struct.

Checked twice, as `SamplingParams` are: on construction (the value alone, `ValueError` naming
the field) and in the frontend against the model (`dimensions` needs a Matryoshka model,
`truncate_prompt_tokens` at most `max_model_len`). The engine gets `normalize` resolved to a
bool, so the worker never guesses a default.
"""

from __future__ import annotations

import msgspec


class PoolingParams(msgspec.Struct, kw_only=True, omit_defaults=True, dict=False):
    """How to pool one prompt into one vector.

    `normalize`: L2-normalize the vector (None: as the checkpoint's sentence-transformers
    config says, else True). `dimensions`: keep the first N values (Matryoshka models only),
    then normalize. `truncate_prompt_tokens`: keep only the last k prompt tokens (-1: up to
    max_model_len); the tokenizer's special tokens are kept.
    """

    truncate_prompt_tokens: int | None = None
    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        def bad(field: str, rule: str, value: object) -> ValueError:
            return ValueError(f"PoolingParams.{field} {rule}, got {value!r}")

        t = self.truncate_prompt_tokens
        if t is not None and (not _is_int(t) or (t < 1 and t != -1)):
            raise bad("truncate_prompt_tokens", "must be None, -1 or an integer >= 1", t)
        if self.dimensions is not None and (not _is_int(self.dimensions) or self.dimensions < 1):
            raise bad("dimensions", "must be None or an integer >= 1", self.dimensions)
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise bad("normalize", "must be None, True or False", self.normalize)

    def clone(self, **changes: object) -> PoolingParams:
        return msgspec.structs.replace(self, **changes)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
