"""What `AsyncLLM` and `LLM` share: model resolution, tokenizer, the engine client, and
the vLLM-named state and config views."""

from __future__ import annotations

import itertools
import logging
import uuid
from typing import Any

import msgspec

from zllm.frontend import engine_configs
from zllm.frontend import model_config as user_config
from zllm.frontend.client_state import ClientState
from zllm.frontend.default_model import resolve_engine_args
from zllm.frontend.engine_client import EngineClient
from zllm.frontend.errors import EngineDeadError
from zllm.frontend.input_processor import InputProcessor, ProcessedRequest, PromptType
from zllm.frontend.model_files import local_model_files
from zllm.frontend.stream import RequestStream
from zllm.protocol.config import DEFAULT_MODEL_NAME, EngineArgs, ModelConfig
from zllm.protocol.messages import Ready
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.rpc import check_user_rpc
from zllm.protocol.sampling_params import SamplingParams

logger = logging.getLogger("zllm")


class EngineFrontend:
    def __init__(self, engine_args: EngineArgs) -> None:
        self._client: EngineClient | None = None
        model_name = engine_args.model
        if engine_args.engine_core_address is None:
            engine_args = resolve_engine_args(engine_args)
            # Fail here, naming the path, before a process is spawned for nothing.
            ModelConfig.from_path(
                engine_args.model,
                engine_args.tokenizer,
                engine_args.max_model_len,
                engine_args.resolved_runner(),
            )
        self.engine_args = engine_args
        # The core starts (imports torch, loads weights) while we load the tokenizer.
        client = self._client = EngineClient(engine_args, wait=False)
        try:
            tokenizer = None
            if not engine_args.skip_tokenizer_init and engine_args.model is not None:
                tokenizer = _load_tokenizer(engine_args.tokenizer or engine_args.model, engine_args)
            ready = client.wait_ready()
            files = ready.model_config.path
            if engine_args.engine_core_address and engine_args.model is None:
                # A daemon's model: its files as it sent them, not its filesystem's paths.
                files = str(local_model_files(client))
                if not engine_args.skip_tokenizer_init:
                    tokenizer = _load_tokenizer(files, engine_args)
        except BaseException:
            client.shutdown()
            raise
        client.tokenizer = self.tokenizer = tokenizer
        # vLLM's view of the model (`get_model_config()`); the engine's struct reads through it.
        if model_name is None:  # the default model, or a daemon's
            model_name = ready.engine_args.model if engine_args.engine_core_address else None
        self.model_config = user_config.ModelConfig(
            ready.model_config, engine_args, model_name or DEFAULT_MODEL_NAME, files
        )
        self.processor = InputProcessor(self.tokenizer, ready)
        self._ids = itertools.count()

    # ---- requests ----------------------------------------------------------------------------

    def _add_request(
        self,
        prompt: PromptType,
        params: SamplingParams | None,
        request_id: str | None,
        priority: int = 0,
    ) -> tuple[str, RequestStream]:
        return self._submit(self._prepare(prompt, params, request_id, priority))

    def _prepare(
        self,
        prompt: PromptType,
        params: SamplingParams | None,
        request_id: str | None,
        priority: int = 0,
        text_ids: list[int] | None = None,
    ) -> ProcessedRequest:
        """Tokenize and check one request (raises `ValueError`); nothing is sent yet.
        `priority`: lower first, under scheduling_policy="priority" (else it must be 0).
        `text_ids`: the prompt's text tokenized already (`InputProcessor.batch_text_ids`)."""
        return self.processor.process(
            request_id or self._new_request_id(),
            prompt,
            params or SamplingParams(),
            priority,
            text_ids,
        )

    def _prepare_pooling(
        self,
        prompt: PromptType,
        params: PoolingParams | None,
        request_id: str | None,
        truncate_prompt_tokens: int | None = None,
        priority: int = 0,
        text_ids: list[int] | None = None,
    ) -> ProcessedRequest:
        """`_prepare` for `encode()` / `embed()`; `truncate_prompt_tokens` is vLLM's keyword
        form of `PoolingParams.truncate_prompt_tokens`."""
        params = params or PoolingParams()
        if not isinstance(params, PoolingParams):
            raise TypeError(f"pooling_params must be PoolingParams, got {type(params).__name__}")
        if truncate_prompt_tokens is not None:
            given = params.truncate_prompt_tokens
            if given is not None and given != truncate_prompt_tokens:
                raise ValueError(
                    f"truncate_prompt_tokens={truncate_prompt_tokens} contradicts "
                    f"PoolingParams.truncate_prompt_tokens={given}"
                )
            params = params.clone(truncate_prompt_tokens=truncate_prompt_tokens)
        return self.processor.process(
            request_id or self._new_request_id(), prompt, params, priority, text_ids
        )

    def _new_request_id(self) -> str:
        return f"{uuid.uuid4().hex[:12]}-{next(self._ids)}"

    def _submit(
        self, request: ProcessedRequest, stream: RequestStream | None = None
    ) -> tuple[str, RequestStream]:
        return request.request_id, self.client.add_request(request, stream)

    @property
    def client(self) -> EngineClient:
        if self._client is None:
            raise EngineDeadError("the engine did not start")
        return self._client

    @property
    def _ready(self) -> Ready:
        ready = self.client.ready
        if ready is None:
            raise EngineDeadError("the engine did not start")
        return ready

    # ---- state (vLLM's names) ----------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """True until the engine dies or is shut down."""
        c = self._client
        return c is not None and c.state is ClientState.RUNNING

    @property
    def is_stopped(self) -> bool:
        return not self.is_running

    @property
    def errored(self) -> bool:
        """True once the engine died (or was shut down): no request can complete any more."""
        c = self._client
        return c is None or c.dead_error is not None

    @property
    def dead_error(self) -> BaseException:
        """The error every call raises now (vLLM returns one even while the engine is alive)."""
        c = self._client
        if c is not None and c.dead_error is not None:
            return c.dead_error
        return EngineDeadError("the engine is not dead")

    def shutdown(self) -> None:
        """Stop the engine processes and free everything. Safe to call twice."""
        if self._client is not None:
            self._client.shutdown()

    def _call(self, method: str, *args: Any):
        return self.client.call(method, *args)

    def _collective_rpc(self, method: Any, args: Any, kwargs: dict | None):
        """Start `collective_rpc`: a worker method by name, msgspec-encodable arguments only
        (checked here: a bad one must fail in the caller, not in the client's I/O thread)."""
        check_user_rpc(method, args, kwargs)
        try:
            msgspec.msgpack.encode([list(args), kwargs or {}])
        except TypeError as e:
            raise TypeError(
                f"collective_rpc arguments must be msgspec-encodable (no pickle crosses a socket): {e}"
            ) from None
        return self._call("collective_rpc", method, list(args), kwargs or {})

    # ---- config views, shared by the sync and async getters --------------------------------------

    def _parallel_config(self) -> engine_configs.ParallelConfig:
        return engine_configs.parallel_config(self._ready)

    def _scheduler_config(self) -> engine_configs.SchedulerConfig:
        return engine_configs.scheduler_config(self._ready)

    def _vllm_config(self) -> engine_configs.VllmConfig:
        ready = self._ready
        return engine_configs.VllmConfig(
            model_config=self.model_config,
            cache_config=engine_configs.cache_config(ready),
            parallel_config=engine_configs.parallel_config(ready),
            scheduler_config=engine_configs.scheduler_config(ready),
            decoding_config=engine_configs.DecodingConfig(),
        )

    def __del__(self) -> None:
        """A dropped engine stops its processes (vLLM users expect `del llm` to free the GPU)."""
        try:
            if self._client is not None:
                self._client.shutdown_soon()
        except Exception:
            pass


def check_sleep_args(level: int | None = None, tags: list[str] | None = None) -> None:
    """Refuse bad arguments here, with a ValueError, rather than as a remote error."""
    if level is not None and level not in (1, 2):
        raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
    if tags is not None:
        unknown = set(tags) - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(
                f"wake_up tags must be 'weights' and/or 'kv_cache', got {sorted(unknown)}"
            )


def _load_tokenizer(path: str, engine_args: EngineArgs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=engine_args.trust_remote_code)
