"""The `zllm` command: generate, chat, download-default, engine-core, bench.

Every `EngineArgs` field is an option (`max_num_seqs` -> `--max-num-seqs`), derived from the
Struct itself so a new engine option shows up here without touching this file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import types
import typing
from collections.abc import Coroutine, Iterable
from typing import Any, TextIO, TypeVar

import msgspec

from zllm.protocol.config import EngineArgs

T = TypeVar("T")

# Sampling defaults for the command line: greedy, so `zllm generate` answers the same way twice.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.0


# ---- EngineArgs as options ----------------------------------------------------------------------


def _value_parser(tp: Any) -> Any:
    """An argparse `type=` for a field of type `tp` (`X | None` parses as X)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            tp = args[0]
    if tp in (str, int, float):
        return tp

    def parse(text: str) -> Any:  # lists, dicts, unions: JSON, or a bare string
        try:
            return msgspec.json.decode(text, type=tp)
        except msgspec.MsgspecError:
            return msgspec.convert(text, tp)

    parse.__name__ = getattr(tp, "__name__", str(tp))
    return parse


def add_engine_args(parser: argparse.ArgumentParser, exclude: Iterable[str] = ()) -> None:
    """One `--kebab-case` option per `EngineArgs` field; unset options keep EngineArgs' defaults."""
    group = parser.add_argument_group("engine options (EngineArgs)")
    for field in msgspec.structs.fields(EngineArgs):
        if field.name in exclude:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not msgspec.NODEFAULT else None
        help_text = f"EngineArgs.{field.name} (default: {default})"
        if field.type is bool:
            group.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                flag,
                dest=field.name,
                type=_value_parser(field.type),
                default=argparse.SUPPRESS,
                metavar=field.name.upper(),
                help=help_text,
            )


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """The `EngineArgs` the user asked for on the command line (only the options given)."""
    names = {f.name for f in msgspec.structs.fields(EngineArgs)}
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in names})


# ---- running coroutines ---------------------------------------------------------------------------


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` in a fresh event loop, uvloop's if installed (the client binds to none)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def stream_to(engine, prompt: Any, params, out: TextIO) -> str:
    """Print each new piece of text as it arrives; return the whole answer."""
    parts: list[str] = []
    async for output in engine.generate(prompt, params):
        for completion in output.outputs:
            if completion.text:
                out.write(completion.text)
                out.flush()
                parts.append(completion.text)
    return "".join(parts)


def _sampling_params(ns: argparse.Namespace):
    from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        seed=getattr(ns, "seed", None),  # `--seed` seeds the engine and the request
        output_kind=RequestOutputKind.DELTA,
    )


def _start_engine(ns: argparse.Namespace):
    from zllm.frontend.async_llm import AsyncLLM

    return AsyncLLM(engine_args_from(ns))


# ---- subcommands ------------------------------------------------------------------------------------


def cmd_generate(ns: argparse.Namespace) -> int:
    params = _sampling_params(ns)
    engine = _start_engine(ns)
    try:
        prompt: Any = ns.prompt
        if ns.chat:
            prompt = engine.processor.chat_prompt([{"role": "user", "content": ns.prompt}])
        run_async(stream_to(engine, prompt, params, sys.stdout))
        sys.stdout.write("\n")
        sys.stdout.flush()
    finally:
        engine.shutdown()
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    params = _sampling_params(ns)
    engine = _start_engine(ns)
    history: list[dict] = []
    print("zllm chat: /exit or Ctrl-D quits, /reset forgets the conversation.", file=sys.stderr)
    try:
        while True:
            try:
                line = input(">>> ").strip()
            except EOFError:
                print()
                return 0
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                history.clear()
                continue
            history.append({"role": "user", "content": line})
            try:
                # One event loop per turn: the client is not bound to any of them.
                answer = run_async(
                    stream_to(engine, engine.processor.chat_prompt(history), params, sys.stdout)
                )
            except ValueError as e:  # e.g. the conversation outgrew max_model_len
                history.pop()
                print(f"\nzllm: {e}", file=sys.stderr)
                continue
            print()
            history.append({"role": "assistant", "content": answer})
    finally:
        engine.shutdown()


def cmd_download_default(ns: argparse.Namespace) -> int:
    from zllm.frontend.default_model import download_default

    print(download_default())
    return 0


def cmd_engine_core(ns: argparse.Namespace) -> int:
    """Serve engine-core in the foreground until SIGTERM/SIGINT; clients connect to `--address`."""
    from zllm.core.main import configure_logging
    from zllm.core.server import EngineCoreServer
    from zllm.frontend.default_model import resolve_model
    from zllm.protocol.process import core_addresses

    configure_logging()
    engine_args = engine_args_from(ns)
    engine_args = msgspec.structs.replace(engine_args, model=resolve_model(engine_args.model))
    input_address, output_address = core_addresses(ns.address)
    logging.getLogger("zllm.core").info(
        "engine-core for %s listening on %s, %s", engine_args.model, input_address, output_address
    )
    server = EngineCoreServer(engine_args, input_address, output_address, owns_addresses=True)
    return server.serve()


# ---- the parser ------------------------------------------------------------------------------------


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy (default)"
    )
    parser.add_argument("--top-p", type=float, default=1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream one completion to stdout")
    gen.add_argument("prompt")
    gen.add_argument(
        "--chat", action="store_true", help="send the prompt as one user message (chat template)"
    )
    _add_sampling_options(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat (history kept, answers streamed)")
    _add_sampling_options(chat)
    add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)

    dl = sub.add_parser(
        "download-default", help="fetch and convert the default model; print its path"
    )
    dl.set_defaults(func=cmd_download_default)

    core = sub.add_parser("engine-core", help="run engine-core as a long-lived daemon (foreground)")
    core.add_argument(
        "--address",
        required=True,
        help="ipc:///path/name (sockets name.in, name.out) or tcp://host:port (port, port+1)",
    )
    add_engine_args(core, exclude=("engine_core_address",))
    core.set_defaults(func=cmd_engine_core)

    from zllm.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from zllm.frontend.errors import EngineDeadError, EngineStartupError

    try:
        return ns.func(ns)
    except KeyboardInterrupt:
        return 130
    except (EngineStartupError, EngineDeadError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"zllm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
