"""What the server holds (the engines behind a router, the served models, metrics, requests
in flight) and how one engine request runs under it: every route generates and encodes
through `ServerState`, so metrics, the shutdown abort and 503s are the same everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from zllm.frontend.async_llm import AsyncLLM
from zllm.frontend.engine_router import EngineRouter, ServedModel
from zllm.frontend.errors import EngineOverloadedError
from zllm.frontend.outputs import RequestOutput
from zllm.frontend.pooling_outputs import PoolingRequestOutput
from zllm.frontend.serve.errors import RETRY_AFTER_S, APIError
from zllm.frontend.serve.metrics import ServerMetrics
from zllm.frontend.serve.response_schemas import now_s
from zllm.protocol.config import EngineArgs
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

logger = logging.getLogger("zllm.serve")


@dataclass
class ServeConfig:
    """The server's own options (the engine's are `EngineArgs`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    served_model_names: list[str] = field(default_factory=list)  # empty: the model as given
    max_body_bytes: int = 8 * 1024 * 1024
    shutdown_timeout: float = 30.0  # also how long an unloaded model's streams may finish
    admin_api_keys: list[str] = field(default_factory=list)  # empty: no /admin/* routes
    load_wait_timeout: float = 30.0  # how long a request for a loading model waits


def shutting_down(reason: str) -> APIError:
    return APIError(503, reason, type="service_unavailable_error", code="shutting_down")


class ModelState:
    """One served model as the routes see it: its tokenizer, defaults and limits, and
    `generate()` / `encode()` routed to one of its replicas."""

    def __init__(self, server: ServerState, name: str, served: ServedModel) -> None:
        self.server = server
        self.model_name = name  # the name clients use
        self.served = served
        engine = served.engine
        self.config = server.config
        self.tokenizer = engine.tokenizer
        self.root = engine.model_config.model
        self.supported_tasks = list(engine.model_config.supported_tasks)
        self.defaults = (
            engine.model_config.get_diff_sampling_param()
            if "generate" in self.supported_tasks
            else {}
        )
        self.max_model_len = engine.model_config.max_model_len

    @property
    def engine(self) -> AsyncLLM:
        """A live replica (for what replicas share: the input processor, the config)."""
        return self.served.engine

    def check_task(self, task: str, route: str) -> None:
        if task not in self.supported_tasks:
            raise APIError(
                400,
                f"{route} needs a model that can {task}; {self.model_name} serves "
                f"{self.supported_tasks}",
                param="model",
            )

    def generate(
        self, prompt: Any, params: SamplingParams, priority: int = 0, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        return self.server.generate(self, prompt, params, priority, request_id)

    async def encode(
        self, prompt: Any, params: PoolingParams, priority: int = 0
    ) -> PoolingRequestOutput:
        return await self.server.encode(self, prompt, params, priority)


class ServerState:
    """One per server: the engines (behind a router) and everything the routes share."""

    def __init__(
        self, router: EngineRouter, config: ServeConfig, engine_args: EngineArgs | None = None
    ) -> None:
        self.router = router
        self.config = config
        self.engine_args = engine_args  # the engine options models loaded at run time get
        names = router.model_names
        if config.served_model_names and len(names) > 1:
            raise ValueError(
                "--served-model-name names one model; with several models, each is served "
                "under the name given to --model or --engine"
            )
        # served name -> the model it serves (--served-model-name: aliases of the one model)
        aliases = {alias: names[0] for alias in config.served_model_names}
        aliases.update((name, name) for name in names if not config.served_model_names)
        self.metrics = ServerMetrics(next(iter(aliases)))
        self.models = {
            alias: ModelState(self, alias, router.model(name)) for alias, name in aliases.items()
        }
        self.loading: dict[str, asyncio.Future] = {}  # names being loaded -> done once settled
        self.draining: set[str] = set()  # names being unloaded
        self.created = now_s()
        self.active: set[str] = set()  # engine request ids in flight
        self.websockets: set[Any] = set()
        self.accepting = True
        self.abort_reason: str | None = None  # set when a stop aborts what is still running

    @property
    def served_names(self) -> list[str]:
        return list(self.models)

    @property
    def model_name(self) -> str:
        """The model a request that names none gets: the first still served."""
        if not self.models:
            raise APIError(404, "this server serves no model now", code="model_not_found")
        return self.served_names[0]

    async def wait_model(self, name: str | None) -> ModelState:
        """`check_model`, once a model still loading is ready: a request for it waits up to
        `load_wait_timeout` seconds, then gets 503 with `Retry-After`."""
        if name in self.loading:
            timeout = self.config.load_wait_timeout
            try:
                await asyncio.wait_for(asyncio.shield(self.loading[name]), timeout)
            except TimeoutError:
                raise APIError(
                    503,
                    f"model {name!r} is still loading after {timeout:g} s; retry later",
                    type="service_unavailable_error",
                    code="model_loading",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                ) from None
        if name in self.draining:
            raise _unloading(name)
        return self.check_model(name)

    def check_model(self, name: str | None) -> ModelState:
        """The served model a request asks for (None: the first), else a 404."""
        if name is None:
            return self.models[self.model_name]
        if name not in self.models:
            raise APIError(
                404,
                f"The model `{name}` does not exist (this server serves {self.served_names}).",
                param="model",
                code="model_not_found",
            )
        return self.models[name]

    def log_request(self, route: str, body: Any) -> None:
        """One debug line per request (`--log-level debug`), with the caller's `user`."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s model=%s user=%r", route, body.model, getattr(body, "user", None))

    def _still_served(self, model: ModelState) -> None:
        """An unload that began after the request found its model: a 503, not a lookup error.
        (No await between this and the router's own lookup.)"""
        if model.served.name not in self.router.models:
            raise _unloading(model.served.name)

    @contextlib.contextmanager
    def _in_flight(self, request_id: str, model: str):
        self.active.add(request_id)
        try:
            yield
        except EngineOverloadedError:
            self.metrics.rejected.labels(model_name=model).inc()
            raise
        finally:
            self.active.discard(request_id)

    async def generate(
        self,
        model: ModelState,
        prompt: Any,
        params: SamplingParams,
        priority: int = 0,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The engine's DELTA outputs for one prompt, observed for the metrics. An output
        aborted by a server stop becomes a 503 saying so."""
        request_id = request_id or f"srv-{uuid.uuid4().hex}"
        timer = self.metrics.timer(model.model_name)
        with self._in_flight(request_id, model.model_name):
            self._still_served(model)
            outputs = self.router.generate(
                prompt, params, request_id, model=model.served.name, priority=priority
            )
            reasons: dict[int, str] = {}  # completion index -> finish reason
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    timer.on_tokens(sum(len(c.token_ids) for c in output.outputs))
                    reasons.update(
                        (c.index, c.finish_reason) for c in output.outputs if c.finish_reason
                    )
                    if output.finished:
                        if self.abort_reason is not None and "abort" in reasons.values():
                            raise shutting_down(self.abort_reason)
                        queue_time = output.metrics.time_in_queue if output.metrics else None
                        timer.on_finish(
                            len(output.prompt_token_ids), list(reasons.values()), queue_time
                        )
                    yield output

    async def encode(
        self, model: ModelState, prompt: Any, params: PoolingParams, priority: int = 0
    ) -> PoolingRequestOutput:
        request_id = f"srv-{uuid.uuid4().hex}"
        timer = self.metrics.timer(model.model_name)
        with self._in_flight(request_id, model.model_name):
            self._still_served(model)
            outputs = self.router.encode(
                prompt, params, request_id, model=model.served.name, priority=priority
            )
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    timer.on_finish(
                        len(output.prompt_token_ids),
                        ["stop"],
                        output.metrics.time_in_queue if output.metrics else None,
                    )
                    return output
        raise shutting_down(self.abort_reason or "the request was aborted")

    async def wait_idle(self, timeout: float) -> bool:
        """Until no engine request is in flight, or `timeout` seconds; True if idle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return not self.active


STATE = web.AppKey("state", ServerState)


def _unloading(name: str) -> APIError:
    return APIError(
        503,
        f"model {name!r} is being unloaded",
        type="service_unavailable_error",
        code="model_unloading",
    )
