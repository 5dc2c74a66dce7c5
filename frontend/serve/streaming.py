"""Streamed answers: server-sent events (OpenAI's `data: {...}\\n\\n` ... `data: [DONE]\\n\\n`)
and NDJSON (the native /generate), and merging several engine streams into one.

The response starts only once the first chunk exists: a request the engine refuses (a bad
prompt, a full queue) still gets its HTTP status. An error after that is sent as an error
event and the stream ends. A client that goes away stops the request (the chunk iterator is
closed, which aborts its engine requests).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from zllm.frontend.serve.errors import ErrorResponse, from_exception

T = TypeVar("T")

_encode = msgspec.json.encode


def _sse(chunk: Any) -> bytes:
    return b"data: " + _encode(chunk) + b"\n\n"


def _ndjson(chunk: Any) -> bytes:
    return _encode(chunk) + b"\n"


async def _stream(
    request: web.Request,
    chunks: AsyncIterator[Any],
    content_type: str,
    frame: Callable[[Any], bytes],
    trailer: bytes,
) -> web.StreamResponse:
    async with contextlib.aclosing(chunks):
        first = await anext(chunks, None)  # an error here is an HTTP error status
        response = web.StreamResponse(
            headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            if first is not None:
                await response.write(frame(first))
            async for chunk in chunks:
                await response.write(frame(chunk))
        except ConnectionResetError:  # the client left: closing `chunks` aborts the request
            return response
        except Exception as e:
            error = from_exception(e)
            await response.write(frame(ErrorResponse(error=error.info)))
        await response.write(trailer)
        await response.write_eof()
        return response


async def sse_response(request: web.Request, chunks: AsyncIterator[Any]) -> web.StreamResponse:
    return await _stream(request, chunks, "text/event-stream", _sse, b"data: [DONE]\n\n")


async def ndjson_response(request: web.Request, chunks: AsyncIterator[Any]) -> web.StreamResponse:
    return await _stream(request, chunks, "application/x-ndjson", _ndjson, b"")


_DONE = object()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(stream index, item) from several streams as items arrive; the first error stops (and
    closes) them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((index, item, None))
        except Exception as e:
            queue.put_nowait((index, None, e))
        finally:
            queue.put_nowait((index, _DONE, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _DONE:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def gather_all(coroutines: list) -> list:
    """`asyncio.gather`, but the first error cancels the others (their requests are aborted)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
