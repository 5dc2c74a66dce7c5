"""`AsyncLLM`: the asyncio client, usable from any event loop, any thread, any number of `asyncio.run()`s."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from zllm.frontend.engine_frontend import EngineFrontend
from zllm.frontend.input_processor import PromptType
from zllm.frontend.outputs import RequestOutput
from zllm.protocol.config import AsyncEngineArgs, EngineArgs
from zllm.protocol.messages import SchedulerStats
from zllm.protocol.sampling_params import SamplingParams


class AsyncLLM(EngineFrontend):
    """Streams generations from a multi-process engine. Nothing here is bound to an event loop."""

    def __init__(self, engine_args: EngineArgs | None = None, **kwargs: Any) -> None:
        super().__init__(engine_args or AsyncEngineArgs(**kwargs))

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **_: Any) -> AsyncLLM:
        return cls(engine_args)

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        **_: Any,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yield `RequestOutput`s for one prompt as the engine produces them.

        Leaving the loop early, cancelling the task or closing the loop aborts the request.
        """
        request_id, stream = self._add_request(prompt, sampling_params, request_id)
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.client.abort([request_id])

    async def abort(self, request_id: str | list[str]) -> None:
        self.client.abort([request_id] if isinstance(request_id, str) else list(request_id))

    async def _utility(self, method: str, *args: Any) -> Any:
        return await asyncio.wrap_future(self._call(method, *args))

    async def check_health(self) -> None:
        self.client.check_alive()
        await self._utility("check_health")

    async def get_model_config(self):
        return self.model_config

    async def get_tokenizer(self):
        return self.tokenizer

    async def reset_prefix_cache(self) -> bool:
        return await self._utility("reset_prefix_cache")

    async def get_stats(self) -> SchedulerStats:
        import msgspec

        return msgspec.convert(await self._utility("get_stats"), SchedulerStats)

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()
