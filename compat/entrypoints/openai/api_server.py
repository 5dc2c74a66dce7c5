"""`vllm.entrypoints.openai.api_server` -> `zllm.entrypoints.openai.api_server`
(docs/vllm-compat.md): the server of `zllm serve`, for scripts that start it themselves.

    parser = make_arg_parser(FlexibleArgumentParser())
    uvloop.run(run_server(parser.parse_args()))
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from zllm.entrypoints.openai.cli_args import make_arg_parser
from zllm.frontend.async_llm import AsyncLLM
from zllm.frontend.engine_router import EngineRouter
from zllm.frontend.serve.app import build_app as _build_app
from zllm.frontend.serve.cli import engine_specs_of, serve_config
from zllm.frontend.serve.server import serve
from zllm.frontend.serve.state import ServerState


async def run_server(args: argparse.Namespace, **_uvicorn_kwargs: object) -> None:
    """Start the engine and serve until SIGTERM/SIGINT, then stop gracefully (vLLM's
    uvicorn options do not apply: the server is aiohttp)."""
    if _uvicorn_kwargs:
        raise TypeError(
            f"run_server: uvicorn options {sorted(_uvicorn_kwargs)} do not apply to zllm's "
            "aiohttp server"
        )
    from zllm.frontend.cli import engine_args_from

    await serve(engine_specs_of(args), serve_config(args), engine_args_from(args))


@contextlib.asynccontextmanager
async def build_async_engine_client(args: argparse.Namespace) -> AsyncIterator[AsyncLLM]:
    """The engine the server would use, shut down on exit (one engine: several models or
    replicas are `run_server`'s)."""
    specs = engine_specs_of(args)
    if len(specs) != 1 or specs[0].replicas != 1:
        raise ValueError(
            "build_async_engine_client starts one engine; --model twice, --engine or "
            "--replicas need run_server"
        )
    engine = AsyncLLM(specs[0].engine_args)
    try:
        yield engine
    finally:
        engine.shutdown()


def build_app(engine_client: AsyncLLM, args: argparse.Namespace) -> web.Application:
    """The aiohttp application over a running engine (vLLM's takes `args` alone and a
    FastAPI app comes back; here the engine is given and the app is aiohttp's)."""
    router = EngineRouter({engine_client.model_config.model: [engine_client]})
    return _build_app(ServerState(router, serve_config(args)))


__all__ = ["build_app", "build_async_engine_client", "make_arg_parser", "run_server"]
