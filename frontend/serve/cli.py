"""`zllm serve [MODEL]`: the server's options, then every engine option (`EngineArgs`:
`--max-queued-requests`, `--scheduling-policy`, `--engine-core-address`, ...)."""

from __future__ import annotations

import argparse
import logging
import os

import msgspec

from zllm.frontend.engine_router import EngineSpec
from zllm.frontend.serve.state import ServeConfig

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `zllm serve` (vLLM's names where it has them)."""
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        help="the model (same as --model); default: the default model",
    )
    group = parser.add_argument_group("server options")
    group.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    group.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1/* (repeat for several keys; "
        "default: $ZLLM_API_KEY, else none)",
    )
    group.add_argument(
        "--admin-api-key",
        action="append",
        default=None,
        help="require `Authorization: Bearer KEY` on /admin/* (load and unload models at run "
        "time; repeat for several keys; default: $ZLLM_ADMIN_API_KEY, else the --api-key "
        "keys; without any key the admin API is off)",
    )
    group.add_argument(
        "--load-wait-timeout",
        type=float,
        default=30.0,
        help="seconds a request for a model still loading (POST /admin/models) waits before "
        "it gets 503 with Retry-After (default: 30)",
    )
    group.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the names clients use for the model (default: the model as given)",
    )
    group.add_argument(
        "--log-level",
        "--uvicorn-log-level",
        dest="log_level",
        choices=LOG_LEVELS,
        default="info",
        help="server log level (default: info; trace: every request)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds requests in flight may run after SIGTERM/SIGINT before they are aborted "
        "(default: 30)",
    )
    group.add_argument(
        "--max-body-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="largest request body taken; larger ones get 413 (default: 8 MiB)",
    )
    engines = parser.add_argument_group("engines (several models, replicas, daemons)")
    engines.add_argument(
        "--model",
        dest="models",
        action="append",
        default=None,
        metavar="PATH_OR_NAME",
        help="a model to serve, under this name, on engine-cores of its own (repeat for "
        "several models; default: the default model)",
    )
    engines.add_argument(
        "--engine",
        dest="engines",
        action="append",
        default=None,
        metavar="NAME=ADDRESS",
        help="serve NAME from a running `zllm engine-core` daemon at ADDRESS (ipc:// or "
        "tcp://, with --curve-* keys); repeat a NAME for replicas",
    )
    engines.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="engine-cores spawned per --model; requests go to the least loaded one, or to "
        "the one that served their prefix (default: 1)",
    )
    from zllm.frontend.cli import add_engine_args

    add_engine_args(parser, exclude=("model",))
    return parser


def serve_config(ns: argparse.Namespace) -> ServeConfig:
    env_key = os.environ.get("ZLLM_API_KEY")
    keys = ns.api_key or ([env_key] if env_key else [])
    if any(not key for key in keys):
        raise ValueError("--api-key: an empty key would let anyone in")
    env_admin = os.environ.get("ZLLM_ADMIN_API_KEY")
    admin_keys = ns.admin_api_key or ([env_admin] if env_admin else keys)
    if any(not key for key in admin_keys):
        raise ValueError("--admin-api-key: an empty key would let anyone in")
    if ns.load_wait_timeout < 0:
        raise ValueError(f"--load-wait-timeout must be >= 0, got {ns.load_wait_timeout}")
    if ns.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {ns.shutdown_timeout}")
    if ns.max_body_bytes < 1024:
        raise ValueError(f"--max-body-bytes must be >= 1024, got {ns.max_body_bytes}")
    return ServeConfig(
        host=ns.host,
        port=ns.port,
        api_keys=keys,
        served_model_names=ns.served_model_name or [],
        max_body_bytes=ns.max_body_bytes,
        shutdown_timeout=ns.shutdown_timeout,
        admin_api_keys=admin_keys,
        load_wait_timeout=ns.load_wait_timeout,
    )


def configure_logging(level: str) -> None:
    """The server's log, and aiohttp's access log at `trace`."""
    python_level = "DEBUG" if level == "trace" else level.upper()
    logging.basicConfig(level=python_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    access = logging.getLogger("aiohttp.access")
    access.setLevel(logging.INFO if level in ("trace", "debug") else logging.WARNING)
    os.environ.setdefault("ZLLM_LOG_LEVEL", python_level)  # engine-core's, inherited


def engine_specs_of(ns: argparse.Namespace) -> list[EngineSpec]:
    """The engines to start or attach: one spec per --model (the positional model first),
    one per --engine; the engine options apply to each."""
    from zllm.frontend.cli import engine_args_from

    if ns.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {ns.replicas}")
    base = engine_args_from(ns)
    models = ([ns.model_tag] if ns.model_tag is not None else []) + (ns.models or [])
    if len(set(models)) < len(models):
        raise ValueError(f"--model: a model given twice in {models} (use --replicas)")
    specs = [EngineSpec(m, msgspec.structs.replace(base, model=m), ns.replicas) for m in models]
    for given in ns.engines or []:
        name, sep, address = given.partition("=")
        if not sep or not name or not address:
            raise ValueError(f"--engine must be NAME=ADDRESS, got {given!r}")
        if name in models:
            raise ValueError(f"--engine {name!r}: that name is already a --model")
        args = msgspec.structs.replace(base, engine_core_address=address)
        specs.append(EngineSpec(name, args))
    if not specs:  # the default model, or --engine-core-address's daemon
        specs.append(EngineSpec(None, base, ns.replicas))
    return specs


def cmd_serve(ns: argparse.Namespace) -> int:
    from zllm.frontend.cli import engine_args_from
    from zllm.frontend.serve.server import run_server

    config = serve_config(ns)
    specs = engine_specs_of(ns)
    configure_logging(ns.log_level)
    return run_server(specs, config, engine_args_from(ns))


def add_serve_parser(sub) -> None:
    parser = sub.add_parser(
        "serve", help="the OpenAI-compatible HTTP server (and /generate, /ws/generate, /metrics)"
    )
    add_server_args(parser)
    parser.set_defaults(func=cmd_serve)
