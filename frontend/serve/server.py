"""Running the server: start the engine, serve on uvloop until SIGTERM/SIGINT, then stop
gracefully: stop listening, let requests in flight finish for `shutdown_timeout` seconds,
abort the rest with a reason their clients see, close WebSockets, shut the engine down."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from zllm.frontend.engine_router import EngineRouter, EngineSpec
from zllm.frontend.serve.app import build_app
from zllm.frontend.serve.state import ServeConfig, ServerState
from zllm.protocol.config import EngineArgs

logger = logging.getLogger("zllm.serve")

DRAIN_AFTER_ABORT_S = 5.0  # aborted streams send their last event within this


async def serve_app(state: ServerState) -> int:
    config = state.config
    runner = web.AppRunner(
        build_app(state), handler_cancellation=True, shutdown_timeout=DRAIN_AFTER_ABORT_S
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"cannot listen on {config.host}:{config.port}: {e.strerror}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (received.append(s.name), stop.set()))
    for name, model in state.models.items():
        logger.info("serving %s as %s (%d replicas)", model.root, name, len(model.served.replicas))
    logger.info("zllm serve: on http://%s:%d", config.host, config.port)
    await stop.wait()
    logger.info(
        "%s: stopping (in-flight requests get %.0f s)", received[0], config.shutdown_timeout
    )
    await graceful_stop(runner, state)
    return 0


async def graceful_stop(runner: web.AppRunner, state: ServerState) -> None:
    state.accepting = False
    for site in list(runner.sites):
        await site.stop()  # no new connections
    timeout = state.config.shutdown_timeout
    if state.loading:  # a model loading now is served (and stopped with the rest) first
        await asyncio.wait([asyncio.shield(f) for f in state.loading.values()], timeout=timeout)
    if not await state.wait_idle(timeout):
        state.abort_reason = (
            f"the server is shutting down: the request was aborted after --shutdown-timeout "
            f"{timeout:g} s"
        )
        logger.warning("aborting %d requests still running", len(state.active))
        await state.router.abort(list(state.active))
        await state.wait_idle(DRAIN_AFTER_ABORT_S)
    for ws in list(state.websockets):
        await ws.close(code=1001, message=b"the server is shutting down")
    await runner.cleanup()


async def serve(
    specs: list[EngineSpec], config: ServeConfig, engine_args: EngineArgs | None = None
) -> int:
    """Start the engines (or attach to daemons), serve, stop; the exit code. The engines
    start in this coroutine: nothing else runs on the loop before it serves. `engine_args`:
    the engine options of models loaded at run time (`POST /admin/models`)."""
    router = EngineRouter.start(specs)
    try:
        return await serve_app(ServerState(router, config, engine_args))
    finally:
        router.shutdown()


def run_server(
    specs: list[EngineSpec], config: ServeConfig, engine_args: EngineArgs | None = None
) -> int:
    from zllm.frontend.cli import run_async

    return run_async(serve(specs, config, engine_args))
