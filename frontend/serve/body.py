"""Request bodies in (size-limited, decoded into a Struct) and JSON answers out."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from zllm.frontend.serve.errors import APIError, decode_json


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server takes ({limit} bytes; --max-body-bytes)",
        code="request_too_large",
    )


async def read_json(request: web.Request, type: Any) -> Any:
    """The body as `type`; 413 beyond the app's size limit, 400 for anything malformed."""
    from zllm.frontend.serve.state import STATE

    limit = request.app[STATE].config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    return decode_json(body, type)


async def read_request(request: web.Request, type: Any, task: str) -> tuple[Any, Any, str]:
    """What every engine route starts with: (the served model's state, the body as `type`,
    the served model name it asked for), once the model is known and can do `task`."""
    from zllm.frontend.serve.state import STATE

    server = request.app[STATE]
    body = await read_json(request, type)
    model = await server.wait_model(body.model)
    model.check_task(task, request.path)
    server.log_request(request.path, body)
    return model, body, model.model_name


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(payload), content_type="application/json"
    )
