"""The `zllm` command: generate, chat, serve, download-default, engine-core, keys, bench.

Every `EngineArgs` field is an option (`max_num_seqs` -> `--max-num-seqs`), and so is every
`SamplingParams` field of `generate` and `chat` (`--top-k`, `--min-p`), derived from the Structs
themselves (`frontend/cli_options.py`) so a new field shows up here without touching this file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Iterable
from typing import Any, TextIO, TypeVar

import msgspec

from zllm.frontend.cli_options import add_struct_options, given_options
from zllm.frontend.cli_output import final_output, print_output
from zllm.protocol.config import DAEMON_CLIENT_OPTIONS, EngineArgs
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams

T = TypeVar("T")

# Sampling defaults for the command line: greedy, so `zllm generate` answers the same way twice.
CLI_SAMPLING = {"max_tokens": 256, "temperature": 0.0}


# ---- EngineArgs and SamplingParams as options ----------------------------------------------------

# Not options of `generate`/`chat`: `--seed` is the engine's (and seeds the request too), and
# the output kind is the command's business (streamed, or whole for n > 1).
SAMPLING_EXCLUDE = ("seed", "output_kind")


def add_engine_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, exclude: Iterable[str] = ()
) -> None:
    """One `--kebab-case` option per `EngineArgs` field; unset options keep EngineArgs' defaults."""
    add_struct_options(parser, EngineArgs, "engine options (EngineArgs)", exclude)


def engine_args_from(ns: argparse.Namespace, cls: type[EngineArgs] = EngineArgs) -> EngineArgs:
    """The `EngineArgs` (or `cls`) the user asked for on the command line (only the options given)."""
    return cls(**given_options(ns, EngineArgs))


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """One option per `SamplingParams` field (`--top-k`, `--min-p`, `--stop`, ...)."""
    add_struct_options(
        parser, SamplingParams, "sampling options (SamplingParams)", SAMPLING_EXCLUDE, CLI_SAMPLING
    )


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


def _sampling_params(ns: argparse.Namespace) -> SamplingParams:
    """Greedy unless told otherwise; `--seed` seeds the engine and the request; streamed
    (DELTA) for one completion, whole (FINAL_ONLY) for several."""
    params = SamplingParams(**{**CLI_SAMPLING, **given_options(ns, SamplingParams)})
    streamed = params.n == 1 and params.detokenize and params.logprobs is None
    streamed = streamed and params.prompt_logprobs is None
    kind = RequestOutputKind.DELTA if streamed else RequestOutputKind.FINAL_ONLY
    return params.clone(output_kind=kind)


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
        if params.output_kind == RequestOutputKind.DELTA:
            run_async(stream_to(engine, prompt, params, sys.stdout))
            sys.stdout.write("\n")
        else:
            print_output(run_async(final_output(engine, prompt, params)), sys.stdout)
        sys.stdout.flush()
    finally:
        engine.shutdown()
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    params = _sampling_params(ns)
    if params.output_kind != RequestOutputKind.DELTA:
        raise ValueError(
            "zllm chat streams one answer: --n, --logprobs and --no-detokenize are for zllm generate"
        )
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
    if ns.embedding:
        from zllm.frontend.default_embedding_model import download_default_embedding

        print(download_default_embedding())
    else:
        from zllm.frontend.default_model import download_default

        print(download_default())
    return 0


def cmd_engine_core(ns: argparse.Namespace) -> int:
    """Serve engine-core in the foreground until SIGTERM/SIGINT; clients connect to `--address`."""
    from zllm.core.main import configure_logging
    from zllm.core.server import EngineCoreServer
    from zllm.core.server_options import ServerOptions
    from zllm.frontend.default_model import resolve_engine_args
    from zllm.protocol.process import core_addresses

    configure_logging()
    input_address, output_address = core_addresses(ns.address)  # ValueError: a bad address
    options = ServerOptions(
        client_timeout=ns.client_timeout,
        drain_timeout=ns.drain_timeout,
        socket_group=ns.socket_group,
        curve_secret_key=ns.server_secret_key,
        curve_clients=ns.curve_clients,
        curve_admins=ns.curve_admins,
        insecure=ns.insecure,
    )
    engine_args = engine_args_from(ns)
    if ns.model_path is not None:
        if engine_args.model is not None and engine_args.model != ns.model_path:
            raise ValueError(f"two models: {ns.model_path!r} and --model {engine_args.model!r}")
        engine_args = msgspec.structs.replace(engine_args, model=ns.model_path)
    server = EngineCoreServer(engine_args, input_address, output_address, options)
    try:  # listen first: a taken or impossible address fails in a moment, not after a load
        server.listen()
        engine_args = resolve_engine_args(engine_args)
        server.engine_args = engine_args
        logging.getLogger("zllm.core").info(
            "engine-core for %s listening on %s, %s%s",
            engine_args.model,
            input_address,
            output_address,
            " (CurveZMQ)" if options.curve else "",
        )
        return server.serve()
    finally:
        server.close()


def cmd_keys_generate(ns: argparse.Namespace) -> int:
    """Write a CurveZMQ key pair: NAME.key (public: give it to the other side) and
    NAME.key_secret (secret, mode 0600)."""
    import os
    from pathlib import Path

    import zmq.auth

    directory = Path(ns.directory)
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (directory / f"{ns.name}{suffix}").exists():
            raise ValueError(f"{directory / (ns.name + suffix)} exists already: not overwritten")
    public, secret = zmq.auth.create_certificates(directory, ns.name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


def add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """`zllm engine-core`'s own options (`core/server_options.py`)."""
    parser.add_argument(
        "model_path",
        nargs="?",
        metavar="MODEL",
        help="the model: a checkpoint directory or hub id (or --model; default: the default model)",
    )
    group = parser.add_argument_group("serving clients")
    group.add_argument(
        "--address",
        required=True,
        help="ipc:///path/name (sockets name.in, name.out) or tcp://host:port (port, port+1)",
    )
    group.add_argument(
        "--client-timeout",
        type=float,
        default=5.0,
        help="forget a client silent this long (s): its requests are aborted (default 5)",
    )
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, let running requests finish this long (s), then abort them; "
        "0 stops at once (default 30)",
    )
    group.add_argument(
        "--socket-group",
        help="ipc socket files 0660 for this group (default: 0600, the daemon's user only)",
    )
    group.add_argument(
        "--curve-secret-key",
        dest="server_secret_key",  # not EngineArgs.curve_secret_key: that is a client's key
        help="CurveZMQ: this daemon's secret key file (zllm keys generate)",
    )
    group.add_argument(
        "--curve-clients", help="CurveZMQ: a directory of client public keys allowed to connect"
    )
    group.add_argument(
        "--curve-admins",
        help="CurveZMQ: a directory of public keys allowed to connect with the admin role "
        "(sleep, wake_up, reset_prefix_cache, collective_rpc, shutdown)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="listen on a non-loopback TCP address without CurveZMQ (anyone reaching it is a client)",
    )


# ---- the parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from zllm import __version__

    parser = argparse.ArgumentParser(prog="zllm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"zllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream one completion to stdout")
    gen.add_argument("prompt")
    gen.add_argument(
        "--chat", action="store_true", help="send the prompt as one user message (chat template)"
    )
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat (history kept, answers streamed)")
    add_sampling_args(chat)
    add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)

    dl = sub.add_parser(
        "download-default", help="fetch and convert the default model; print its path"
    )
    dl.add_argument(
        "--embedding",
        action="store_true",
        help="the default embedding model (all-MiniLM-L6-v2) instead",
    )
    dl.set_defaults(func=cmd_download_default)

    core = sub.add_parser("engine-core", help="run engine-core as a long-lived daemon (foreground)")
    add_daemon_options(core)
    add_engine_args(core, exclude=("engine_core_address", *DAEMON_CLIENT_OPTIONS))
    core.set_defaults(func=cmd_engine_core)

    from zllm.frontend.serve.cli import add_serve_parser

    add_serve_parser(sub)

    keys = sub.add_parser("keys", help="CurveZMQ keys for engine-core daemons and their clients")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser("generate", help="write a key pair: NAME.key, NAME.key_secret")
    generate.add_argument("directory")
    generate.add_argument("--name", default="zllm", help="file name stem (default: zllm)")
    generate.set_defaults(func=cmd_keys_generate)

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
    except (
        EngineStartupError,
        EngineDeadError,
        FileNotFoundError,
        ValueError,
        RuntimeError,
        OSError,
    ) as e:
        print(f"zllm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
