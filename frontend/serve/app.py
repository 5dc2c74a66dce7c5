"""The aiohttp application: routes and the middlewares every request meets (errors as
OpenAI's JSON, the API key on `/v1/*`, 503 once the server is stopping)."""

from __future__ import annotations

import hmac
import logging

from aiohttp import web

from zllm.frontend.serve import admin, chat, completions, embeddings, native, websocket
from zllm.frontend.serve.body import too_large
from zllm.frontend.serve.errors import APIError, from_exception
from zllm.frontend.serve.state import STATE, ServerState, shutting_down

logger = logging.getLogger("zllm.serve")

_HTTP_ERROR_TYPES = {404: "not_found_error", 405: "invalid_request_error"}


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:
        return e.response()
    except web.HTTPRequestEntityTooLarge:
        return too_large(request.app[STATE].config.max_body_bytes).response()
    except web.HTTPException as e:  # aiohttp's own: unknown route, wrong method
        if e.status < 400:
            raise
        message = f"{e.reason}: {request.method} {request.path}"
        error_type = _HTTP_ERROR_TYPES.get(e.status, "invalid_request_error")
        return APIError(e.status, message, type=error_type).response()
    except Exception as e:
        return from_exception(e).response()


def _check_key(request: web.Request, keys: list[str]) -> None:
    header = request.headers.get("Authorization", "")
    token = header[7:] if header.startswith("Bearer ") else None
    if token is None or not any(hmac.compare_digest(token, key) for key in keys):
        raise APIError(
            401,
            "missing or wrong API key: send `Authorization: Bearer <key>`",
            type="authentication_error",
            code="invalid_api_key",
        )


@web.middleware
async def gate_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The API key on every `/v1/*` call, the admin key on `/admin/*` (which is off without
    one); nothing new once the server is stopping."""
    state = request.app[STATE]
    if not state.accepting:
        raise shutting_down("the server is shutting down")
    keys = state.config.api_keys
    if keys and request.path.startswith("/v1/"):
        _check_key(request, keys)
    if request.path.startswith("/admin/"):
        if not state.config.admin_api_keys:
            raise APIError(
                403,
                "the admin API is off: start the server with --admin-api-key (or --api-key)",
                type="permission_error",
            )
        _check_key(request, state.config.admin_api_keys)
    return await handler(request)


def build_app(state: ServerState) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, gate_middleware],
        client_max_size=state.config.max_body_bytes,
    )
    app[STATE] = state
    app.add_routes(
        [
            web.post("/v1/completions", completions.create_completion),
            web.post("/v1/chat/completions", chat.create_chat_completion),
            web.post("/v1/embeddings", embeddings.create_embedding),
            web.get("/v1/models", native.models),
            web.post("/pooling", embeddings.create_pooling),
            web.post("/generate", native.generate),
            web.get("/ws/generate", websocket.ws_generate),
            web.get("/health", native.health),
            web.get("/ping", native.health),
            web.post("/ping", native.health),
            web.get("/models", native.models),
            web.get("/version", native.version),
            web.post("/tokenize", native.tokenize),
            web.post("/detokenize", native.detokenize),
            web.get("/metrics", native.metrics),
            *admin.ROUTES,
        ]
    )
    return app
