"""Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` with the right
HTTP status. A client's mistake is a 4xx naming what is wrong; only a bug is a 500."""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from aiohttp import web

from zllm.frontend.errors import EngineDeadError, EngineOverloadedError

logger = logging.getLogger("zllm.serve")

RETRY_AFTER_S = 1  # what an overloaded server asks a client to wait before retrying


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo


class APIError(Exception):
    """An HTTP error answer; raised anywhere in a route, rendered by `error_middleware`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers or {}

    def body(self) -> bytes:
        return msgspec.json.encode(ErrorResponse(error=self.info))

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param if param is not None else param_of(message))


def overloaded(message: str) -> APIError:
    return APIError(
        503,
        message,
        type="service_unavailable_error",
        code="overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def engine_dead(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable_error", code="engine_dead")


_FIELD_PREFIX = re.compile(r"^(?:SamplingParams|PoolingParams)\.(\w+)")
_PATH_PREFIX = re.compile(r"^([\w.\[\]]+): ")
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_PROMPT = re.compile(r"^(?:the )?prompt\b")  # the shared admission rules' words for the prompt


def param_of(message: str) -> str | None:
    """The field an engine message names ("SamplingParams.top_k must...", "prompt_token_ids[3]:
    ..."), for the error's `param`."""
    for pattern in (_FIELD_PREFIX, _PATH_PREFIX):
        match = pattern.match(message)
        if match:
            return match.group(1)
    return "prompt" if _PROMPT.match(message) else None


def from_exception(error: BaseException) -> APIError:
    """What an exception from the engine or the request's own checks means to the client."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineOverloadedError):
        return overloaded(str(error))
    if isinstance(error, EngineDeadError):
        return engine_dead(str(error))
    if isinstance(error, ValueError | NotImplementedError):
        return bad_request(str(error))
    logger.exception("internal error", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="internal_error")


def validation_error(error: msgspec.ValidationError) -> APIError:
    """msgspec's "Expected `int`, got `str` - at `$.max_tokens`" as a 400 naming the field."""
    text = str(error)
    unknown = _UNKNOWN_FIELD.search(text)
    at = _AT_PATH.search(text)
    path = at.group(1) if at else ""
    message = text[: at.start()] if at else text
    if unknown:
        field = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return APIError(400, f"unknown field `{field}`: zllm does not take it here", param=field)
    if path:
        return APIError(400, f"{path}: {message[:1].lower()}{message[1:]}", param=path)
    return APIError(400, f"the request body is not what this route takes: {message}")


def decode_json(body: bytes, type: Any) -> Any:
    """A request body as `type` (a msgspec Struct), or a 400 saying what is wrong."""
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.ValidationError as e:
        raise validation_error(e) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise APIError(
            400, f"the request body is not valid UTF-8: {e.reason} at byte {e.start}"
        ) from None
