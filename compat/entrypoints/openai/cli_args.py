"""`vllm.entrypoints.openai.cli_args` -> `zllm.entrypoints.openai.cli_args` (docs/vllm-compat.md)."""

from __future__ import annotations

from typing import Any


def make_arg_parser(parser: Any) -> Any:
    """`zllm serve`'s options (server, then every engine option) on `parser`; returns it."""
    from zllm.frontend.serve.cli import add_server_args

    return add_server_args(parser)


__all__ = ["make_arg_parser"]
