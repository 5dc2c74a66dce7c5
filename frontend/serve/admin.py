"""The admin API (`/admin/*`, admin API key required): models loaded and unloaded at run time.

`POST /admin/models` spawns the engine-cores of a new model and answers once it is served;
meanwhile `GET /admin/models` shows it `loading`, and requests naming it wait for it
(`ServerState.wait_model`). `DELETE /admin/models/{name}` stops routing to it, lets its
in-flight streams finish (up to `--shutdown-timeout`), then stops its engines."""

from __future__ import annotations

import asyncio
import logging

import msgspec
from aiohttp import web

from zllm.frontend.engine_router import EngineRouter, EngineSpec
from zllm.frontend.serve.body import json_response, read_json
from zllm.frontend.serve.errors import APIError
from zllm.frontend.serve.state import STATE, ModelState, ServerState

logger = logging.getLogger("zllm.serve")


class LoadModelRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str  # a path or hub name, as `--model` takes it
    name: str | None = None  # the name clients use (default: `model`)
    replicas: int = 1


def model_status(state: ServerState) -> dict[str, str]:
    status = dict.fromkeys(state.models, "ready")
    status.update(dict.fromkeys(state.loading, "loading"))
    status.update(dict.fromkeys(state.draining, "draining"))
    return status


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(
        {"models": [{"id": name, "status": s} for name, s in model_status(state).items()]}
    )


async def load_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body: LoadModelRequest = await read_json(request, LoadModelRequest)
    name = body.name or body.model
    if name in model_status(state):
        raise APIError(409, f"model {name!r} is already {model_status(state)[name]}", param="name")
    if state.engine_args is None:
        raise APIError(400, "this server was started without engine options to load models with")
    try:
        args = msgspec.structs.replace(
            state.engine_args, model=body.model, engine_core_address=None
        )
        spec = EngineSpec(name, args, body.replicas)
    except ValueError as e:
        raise APIError(400, str(e), param="replicas") from None
    done = state.loading[name] = asyncio.get_running_loop().create_future()
    # shielded: a client that hangs up does not leave half-started engines behind
    await asyncio.shield(_load(state, spec, done))
    return json_response({"id": name, "status": "ready"})


async def _load(state: ServerState, spec: EngineSpec, done: asyncio.Future) -> None:
    name = spec.name
    logger.info("loading %s as %s (%d replicas)", spec.engine_args.model, name, spec.replicas)
    try:
        engines = (await asyncio.to_thread(EngineRouter.start_engines, [spec]))[name]
        served = state.router.add_model(name, engines)
        state.models[name] = ModelState(state, name, served)
        logger.info("serving %s as %s", spec.engine_args.model, name)
    except Exception as e:
        logger.error("loading %s failed: %s", name, e)
        raise APIError(
            400 if isinstance(e, ValueError) else 500, f"loading model {name!r} failed: {e}"
        ) from None
    finally:
        del state.loading[name]
        done.set_result(None)


async def unload_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["name"]
    model = state.models.get(name)
    if model is None:
        status = model_status(state).get(name)
        if status is None:
            raise APIError(404, f"model {name!r} is not served", code="model_not_found")
        raise APIError(409, f"model {name!r} is {status}")
    router_name = model.served.name
    aliases = [alias for alias, m in state.models.items() if m.served.name == router_name]
    for alias in aliases:
        del state.models[alias]
    state.draining.update(aliases)
    await asyncio.shield(_unload(state, router_name, aliases))
    return json_response({"id": name, "status": "stopped"})


async def _unload(state: ServerState, router_name: str, aliases: list[str]) -> None:
    logger.info("unloading %s: draining its requests", router_name)
    try:
        await state.router.remove_model(router_name, state.config.shutdown_timeout)
    finally:
        state.draining.difference_update(aliases)
    logger.info("unloaded %s", router_name)


ROUTES = [
    web.get("/admin/models", list_models),
    web.post("/admin/models", load_model),
    web.delete("/admin/models/{name}", unload_model),
]
