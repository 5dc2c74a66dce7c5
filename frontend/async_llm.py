"""`AsyncLLM`: the asyncio client, usable from any event loop, any thread, any number of `asyncio.run()`s.

Nothing here is bound to an event loop: the sockets belong to the client's private I/O
thread, and each `await` waits on whichever loop is running it at that moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgspec

from zllm.frontend.engine_client import EngineClient
from zllm.frontend.engine_configs import (
    DecodingConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from zllm.frontend.engine_frontend import EngineFrontend, check_sleep_args
from zllm.frontend.input_processor import ProcessedRequest, PromptType
from zllm.frontend.metrics_reader import stats_line
from zllm.frontend.model_config import ModelConfig
from zllm.frontend.outputs import RequestOutput
from zllm.frontend.pooling_outputs import PoolingRequestOutput
from zllm.frontend.pooling_state import ABORTED
from zllm.protocol.config import AsyncEngineArgs, EngineArgs
from zllm.protocol.messages import SchedulerStats
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

logger = logging.getLogger("zllm")


class AsyncLLM(EngineFrontend):
    """Streams generations (and pooled vectors) from a multi-process engine."""

    def __init__(self, engine_args: EngineArgs | None = None, **kwargs: Any) -> None:
        super().__init__(engine_args or AsyncEngineArgs(**kwargs))

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **_: Any) -> AsyncLLM:
        return cls(engine_args)

    def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        lora_request: Any = None,
        priority: int = 0,
        trace_headers: Any = None,
        tokenization_kwargs: dict | None = None,
        data_parallel_rank: int | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yield `RequestOutput`s for one prompt as the engine produces them.

        `priority`: lower runs first when the engine has scheduling_policy="priority" (else it
        must be 0). Leaving the loop early, cancelling the task, closing the loop or dropping
        the generator aborts the request in the engine (its KV blocks are freed within one
        step). A request aborted with `abort()` ends with an output whose `finish_reason` is
        "abort"; a dead engine raises `EngineDeadError`. vLLM keywords zllm cannot honour
        raise `NotImplementedError` when given a value; unknown ones are a `TypeError`.
        """

        def prepare() -> ProcessedRequest:  # at the first iteration, as vLLM's generator does
            _refuse_unsupported(
                lora_request=lora_request,
                trace_headers=trace_headers,
                tokenization_kwargs=tokenization_kwargs,
                data_parallel_rank=data_parallel_rank,
            )
            return self._prepare(prompt, sampling_params, request_id, priority)

        return self._generation(prepare)

    async def _generation(
        self, prepare: Callable[[], ProcessedRequest]
    ) -> AsyncGenerator[RequestOutput, None]:
        """The one generator of a request: closing it aborts the request at once (no generator
        wraps it, so none has to remember to close it). `prepare` tokenizes and checks (a
        router prepares once, then picks the replica by the prompt's tokens)."""
        request_id, stream = self._submit(prepare())
        guard = _AbortIfAbandoned(self.client, request_id)
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    guard.armed = False
                    raise item
                if item.finished:
                    guard.armed = False
                yield item
                if item.finished:
                    return
        finally:
            if guard.armed:
                guard.armed = False
                self.client.abort([request_id])

    def encode(
        self,
        prompt: PromptType,
        pooling_params: PoolingParams | None = None,
        request_id: str | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        priority: int = 0,
        lora_request: Any = None,
    ) -> AsyncGenerator[PoolingRequestOutput, None]:
        """Yield the one, final `PoolingRequestOutput` of a prompt (`outputs.data`: its pooled
        vector as the model's pooling and `pooling_params` ask).

        Pooling requests run in the same steps as generation requests. Cancelling aborts the
        request; a request aborted with `abort()` ends without an output.
        """

        def prepare() -> ProcessedRequest:
            _refuse_unsupported(lora_request=lora_request)
            return self._prepare_pooling(
                prompt, pooling_params, request_id, truncate_prompt_tokens, priority
            )

        return self._pooling(prepare)

    async def _pooling(
        self, prepare: Callable[[], ProcessedRequest]
    ) -> AsyncGenerator[PoolingRequestOutput, None]:
        request_id, stream = self._submit(prepare())
        guard = _AbortIfAbandoned(self.client, request_id)
        try:
            item = await stream.get()
            guard.armed = False
            if isinstance(item, BaseException):
                raise item
            if item is not ABORTED:
                yield item
        finally:
            if guard.armed:
                guard.armed = False
                self.client.abort([request_id])

    async def abort(self, request_id: str | list[str]) -> None:
        """Stop requests; their `generate()` streams end with finish_reason "abort"."""
        self.client.abort([request_id] if isinstance(request_id, str) else list(request_id))

    async def _utility(self, method: str, *args: Any) -> Any:
        return await asyncio.wrap_future(self._call(method, *args))

    # ---- health and introspection (vLLM's names) ---------------------------------------------

    async def check_health(self) -> None:
        """Raise `EngineDeadError` if engine-core or a worker is gone."""
        self.client.check_alive()
        await self._utility("check_health")

    async def get_model_config(self) -> ModelConfig:
        return self.model_config

    async def get_decoding_config(self) -> DecodingConfig:
        return DecodingConfig()

    async def get_parallel_config(self) -> ParallelConfig:
        return self._parallel_config()

    async def get_scheduler_config(self) -> SchedulerConfig:
        return self._scheduler_config()

    async def get_vllm_config(self) -> VllmConfig:
        return self._vllm_config()

    async def do_log_stats(self, *_: Any) -> None:
        """Log the engine's state in one line (vLLM's stat logging); off with the default
        `disable_log_stats=True`, as in vLLM."""
        if not self.engine_args.disable_log_stats:
            logger.info("%s", stats_line(await self.get_stats()))

    async def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> list[Any]:
        """See `LLM.collective_rpc`."""
        future = asyncio.wrap_future(self._collective_rpc(method, args, kwargs))
        return await asyncio.wait_for(future, timeout)

    async def start_profile(self) -> None:
        """See `LLM.start_profile`."""
        await self.collective_rpc("start_profile")

    async def stop_profile(self) -> None:
        for path in await self.collective_rpc("stop_profile"):
            logger.info("profiler trace written to %s", path)

    async def get_tokenizer(self, lora_request: Any = None):
        return self.tokenizer

    async def reset_prefix_cache(self, device: Any = None) -> bool:
        """Forget cached prefixes; False while requests hold blocks."""
        return await self._utility("reset_prefix_cache")

    async def get_stats(self) -> SchedulerStats:
        return msgspec.convert(await self._utility("get_stats"), SchedulerStats)

    # ---- sleep mode --------------------------------------------------------------------------

    async def sleep(self, level: int = 1) -> None:
        """Free the device: level 1 moves the weights to host memory and drops the KV cache;
        level 2 drops the weights too (re-read from the checkpoint on wake-up). Requests that
        arrive meanwhile wait; running ones are recomputed after `wake_up`."""
        check_sleep_args(level=level)
        await self._utility("sleep", level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore `tags` ("weights", "kv_cache"; None: both). The engine runs again once both are back."""
        check_sleep_args(tags=tags)
        await self._utility("wake_up", tags)

    async def is_sleeping(self) -> bool:
        return await self._utility("is_sleeping")

    # ---- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()


_WHY_UNSUPPORTED = {
    "lora_request": "no LoRA adapters",
    "trace_headers": "no OpenTelemetry tracing",
    "tokenization_kwargs": "the prompt is tokenized with the tokenizer's defaults",
    "data_parallel_rank": "one engine, no data parallelism",
}


def _refuse_unsupported(**given: Any) -> None:
    """vLLM's keywords that zllm accepts only unset: a value raises, naming the keyword."""
    for name, value in given.items():
        if value is not None:
            raise NotImplementedError(
                f"{name} is not supported by zllm ({_WHY_UNSUPPORTED[name]}); got {value!r}"
            )


class _AbortIfAbandoned:
    """Aborts a request whose generator is garbage-collected without running its `finally`
    (its loop was closed before it could be finalized)."""

    __slots__ = ("client", "request_id", "armed")

    def __init__(self, client: EngineClient, request_id: str) -> None:
        self.client = client
        self.request_id = request_id
        self.armed = True

    def __del__(self) -> None:
        if self.armed:
            self.client.abort_soon(self.request_id)
