"""Msgspec Structs as command-line options: every field of `EngineArgs` and `SamplingParams`
is a `--kebab-case` option (`max_num_seqs` -> `--max-num-seqs`), derived from the Struct
itself so a new field shows up without touching the command line.

Unset options are left out of the namespace (`argparse.SUPPRESS`), so the Struct's own
defaults apply and `vars(parser.parse_args())` holds only what the user typed.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec


def value_parser(tp: Any) -> Any:
    """An argparse `type=` for a field of type `tp` (`X | None` parses as X): JSON, else the
    bare text (`--stop END` is `["END"]`, `--stop-token-ids 7` is `[7]`)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            tp = args[0]
    if tp in (str, int, float):
        return tp
    is_list = typing.get_origin(tp) is list

    def parse(text: str) -> Any:
        try:
            return msgspec.json.decode(text, type=tp)
        except msgspec.MsgspecError:
            pass
        try:
            return msgspec.convert([text] if is_list else text, tp, strict=False)
        except msgspec.MsgspecError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

    parse.__name__ = getattr(tp, "__name__", str(tp))
    return parse


def add_struct_options(
    container: argparse.ArgumentParser | argparse._ArgumentGroup,
    struct: type[msgspec.Struct],
    title: str,
    exclude: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One option per public field of `struct`, in a group titled `title` (or straight into
    `container` when it is already a group, as vLLM's examples pass one). List fields add up
    over repeated options; `defaults` are shown in the help (the caller applies them)."""
    if isinstance(container, argparse._ArgumentGroup):
        group = container
    else:
        group = container.add_argument_group(title)
    defaults = defaults or {}
    for field in msgspec.structs.fields(struct):
        if field.name in exclude or field.name.startswith("_"):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not msgspec.NODEFAULT else None
        help_text = f"{struct.__name__}.{field.name} (default: {defaults.get(field.name, default)})"
        common = dict(dest=field.name, default=argparse.SUPPRESS, help=help_text)
        if field.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            continue
        parse = value_parser(field.type)
        is_list = "list[" in str(field.type)
        group.add_argument(
            flag,
            type=parse,
            action="extend" if is_list else "store",
            metavar=field.name.upper(),
            **common,
        )


def given_options(ns: argparse.Namespace, struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The fields of `struct` that the command line set."""
    names = {f.name for f in msgspec.structs.fields(struct)}
    return {k: v for k, v in vars(ns).items() if k in names}
