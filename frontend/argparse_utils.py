"""vLLM's `FlexibleArgumentParser`: `--max_model_len` means `--max-model-len`, as in vLLM's
example scripts (which are written for either spelling)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


class FlexibleArgumentParser(argparse.ArgumentParser):
    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if args is None:
            args = sys.argv[1:]
        return super().parse_known_args([_dashed(a) for a in args], namespace)


def _dashed(arg: str) -> str:
    """`--max_model_len=8` -> `--max-model-len=8`; values and short options are left alone."""
    if not arg.startswith("--"):
        return arg
    key, sep, value = arg.partition("=")
    return key.replace("_", "-") + sep + value
