"""What `AsyncLLM` and `LLM` share: model resolution, tokenizer, the engine client, and
the vLLM-named introspection methods."""

from __future__ import annotations

import itertools
import logging
import uuid
from typing import Any

import msgspec

from zllm.frontend.default_model import resolve_model
from zllm.frontend.engine_client import EngineClient
from zllm.frontend.errors import EngineDeadError
from zllm.frontend.input_processor import InputProcessor, PromptType
from zllm.frontend.stream import RequestStream
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.sampling_params import SamplingParams

logger = logging.getLogger("zllm")


class EngineFrontend:
    def __init__(self, engine_args: EngineArgs) -> None:
        self._client: EngineClient | None = None
        if engine_args.engine_core_address is None:
            engine_args = msgspec.structs.replace(
                engine_args, model=resolve_model(engine_args.model)
            )
        self.engine_args = engine_args
        self.tokenizer = None
        if not engine_args.skip_tokenizer_init and engine_args.model is not None:
            self.tokenizer = _load_tokenizer(engine_args.tokenizer or engine_args.model)
        self._client = EngineClient(engine_args, self.tokenizer)
        ready = self._client.ready
        if (
            self.tokenizer is None and not engine_args.skip_tokenizer_init
        ):  # a daemon told us its model
            self.tokenizer = _load_tokenizer(ready.model_config.tokenizer)
            self._client.tokenizer = self.tokenizer
        self.model_config: ModelConfig = ready.model_config
        self.processor = InputProcessor(self.tokenizer, ready)
        self._ids = itertools.count()

    # ---- requests ----------------------------------------------------------------------------

    def _add_request(
        self, prompt: PromptType, params: SamplingParams | None, request_id: str | None
    ) -> tuple[str, RequestStream]:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, ids = self.processor.tokenize(prompt)
        self.processor.check(ids, params)
        request_id = (
            request_id if request_id is not None else f"{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        )
        return request_id, self.client.add_request(request_id, text, ids, params)

    @property
    def client(self) -> EngineClient:
        if self._client is None:
            raise EngineDeadError("the engine did not start")
        return self._client

    # ---- state -------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        c = self._client
        return c is not None and not c._closed and c.dead_error is None

    @property
    def errored(self) -> bool:
        c = self._client
        return c is not None and c.dead_error is not None

    @property
    def dead_error(self) -> BaseException:
        c = self._client
        return (
            c.dead_error
            if c is not None and c.dead_error is not None
            else EngineDeadError("the engine is not dead")
        )

    def shutdown(self) -> None:
        """Stop the engine processes and free everything. Safe to call twice."""
        if self._client is not None:
            self._client.shutdown()

    def _call(self, method: str, *args: Any):
        return self.client.call(method, *args)

    def get_model_config_sync(self) -> ModelConfig:
        return self.model_config

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
