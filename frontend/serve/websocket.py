"""`GET /ws/generate`: many requests over one WebSocket, each message tagged with the client's
request id.

Client -> server (JSON text frames):
    {"type": "generate", "request_id": "a", "prompt": "...", "stream": true, <SamplingParams fields>}
    {"type": "cancel", "request_id": "a"}
Server -> client:
    {"type": "output", "request_id": "a", "outputs": [...], "finished": false}  (deltas if
    streamed, else one finished message), the last one with "usage"
    {"type": "error", "request_id": "a" or null, "error": {"message", "type", "param", "code"}}

A message that is not understood gets an error message; the socket stays open. Closing the
socket aborts its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import WSMsgType, web

from zllm.frontend.serve.errors import APIError, bad_request, decode_json, from_exception
from zllm.frontend.serve.gather import gather
from zllm.frontend.serve.native import output_json, prompt_of
from zllm.frontend.serve.params import native_params
from zllm.frontend.serve.request_schemas import WsCancel, WsMessage
from zllm.frontend.serve.response_schemas import UsageInfo
from zllm.frontend.serve.state import STATE, ServerState
from zllm.frontend.serve.streaming import merge


def _request_id_of(text: str) -> str | None:
    """The request id of a message we could not read, if it has one, for the error reply."""
    try:
        value = msgspec.json.decode(text)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    request_id = value.get("request_id") if isinstance(value, dict) else None
    return request_id if isinstance(request_id, str) else None


class WebSocketSession:
    def __init__(self, state: ServerState, ws: web.WebSocketResponse) -> None:
        self.state = state
        self.ws = ws
        self.tasks: dict[str, asyncio.Task] = {}  # the client's request id -> its task
        self.engine_ids: dict[str, str] = {}  # the client's request id -> the engine's
        self.send_lock = asyncio.Lock()

    async def send(self, payload: Any) -> None:
        async with self.send_lock:
            if not self.ws.closed:
                await self.ws.send_str(msgspec.json.encode(payload).decode())

    async def send_error(self, request_id: str | None, error: APIError) -> None:
        await self.send({"type": "error", "request_id": request_id, "error": error.info})

    async def on_text(self, text: str) -> None:
        try:
            message = decode_json(text.encode("utf-8", "surrogatepass"), WsMessage)
        except APIError as e:
            await self.send_error(_request_id_of(text), e)
            return
        request_id = message.request_id
        try:
            if isinstance(message, WsCancel):
                await self._cancel(request_id)
            else:
                self._start(message)
        except APIError as e:
            await self.send_error(request_id, e)
        except (ValueError, NotImplementedError) as e:
            await self.send_error(request_id, from_exception(e))

    def _start(self, message: Any) -> None:
        request_id = message.request_id
        if request_id in self.tasks:
            raise bad_request(
                f"request_id {request_id!r} is in use by a running request", "request_id"
            )
        params = native_params(message)
        engine_id = f"ws-{uuid.uuid4().hex}"
        if message.model in self.state.loading:  # answered in its turn, once it is ready
            outputs = self._when_loaded(message, params, engine_id)
        else:
            model = self.state.check_model(message.model)
            model.check_task("generate", "/ws/generate")
            outputs = model.generate(prompt_of(message), params, message.priority, engine_id)
        self.engine_ids[request_id] = engine_id
        self.tasks[request_id] = asyncio.ensure_future(
            self._run(request_id, merge([outputs]), params.n, message.stream)
        )

    async def _when_loaded(self, message: Any, params: Any, engine_id: str) -> AsyncIterator[Any]:
        """The outputs of a request for a model still loading: it waits as HTTP requests do
        (`--load-wait-timeout`, then a 503 error reply), without holding up the socket."""
        model = await self.state.wait_model(message.model)
        model.check_task("generate", "/ws/generate")
        outputs = model.generate(prompt_of(message), params, message.priority, engine_id)
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                yield output

    async def _cancel(self, request_id: str) -> None:
        engine_id = self.engine_ids.get(request_id)
        if engine_id is None:
            raise bad_request(f"no running request has request_id {request_id!r}", "request_id")
        await self.state.router.abort(engine_id)  # its stream ends with finish_reason "abort"

    async def _run(self, request_id: str, outputs: Any, n: int, stream: bool) -> None:
        head = {"type": "output", "request_id": request_id}
        try:
            async with contextlib.aclosing(outputs):
                if not stream:
                    (result,) = await gather(outputs, 1, n)
                    tokens = sum(len(c.token_ids) for c in result.choices)
                    await self.send(
                        {
                            **head,
                            "outputs": [output_json(i, c) for i, c in enumerate(result.choices)],
                            "finished": True,
                            "usage": UsageInfo.of(len(result.prompt_token_ids), tokens),
                        }
                    )
                    return
                tokens = 0
                async for _, output in outputs:
                    tokens += sum(len(c.token_ids) for c in output.outputs)
                    message = {
                        **head,
                        "outputs": [output_json(c.index, c) for c in output.outputs],
                        "finished": output.finished,
                    }
                    if output.finished:
                        message["usage"] = UsageInfo.of(len(output.prompt_token_ids), tokens)
                    await self.send(message)
        except Exception as e:
            await self.send_error(request_id, from_exception(e))
        finally:
            self.tasks.pop(request_id, None)
            self.engine_ids.pop(request_id, None)

    async def close(self) -> None:
        """The socket is gone: stop its requests (cancelling aborts them in the engine)."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def ws_generate(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    ws = web.WebSocketResponse(max_msg_size=state.config.max_body_bytes)
    await ws.prepare(request)
    session = WebSocketSession(state, ws)
    state.websockets.add(ws)
    try:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await session.on_text(message.data)
            elif message.type == WSMsgType.BINARY:
                await session.send_error(None, bad_request("send JSON as text frames, not binary"))
    finally:
        state.websockets.discard(ws)
        await session.close()
    return ws
