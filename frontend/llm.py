"""`LLM`: the synchronous client for batch generation and chat (vLLM's offline API)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import msgspec
from tqdm import tqdm

from zllm.frontend.engine_configs import DecodingConfig, ParallelConfig, SchedulerConfig
from zllm.frontend.engine_frontend import EngineFrontend, Prepared, check_sleep_args
from zllm.frontend.input_processor import PromptType
from zllm.frontend.outputs import RequestOutput
from zllm.frontend.pooling_outputs import EmbeddingRequestOutput, PoolingRequestOutput
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.messages import SchedulerStats
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams


class LLM(EngineFrontend):
    """`LLM(model=..., **engine_args)`; every `EngineArgs` field is a keyword."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(EngineArgs(model=model, **kwargs))

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        Blocks the calling thread, so it refuses to run on a thread whose event loop is running
        (it would freeze that loop): it raises `RuntimeError` at once there. Use `AsyncLLM`, or
        `await asyncio.to_thread(llm.generate, ...)`. Any other thread may call it, also while
        other threads run their own loops or generate at the same time.
        """
        _refuse_inside_running_loop("LLM.generate")
        prompts = _prompt_list(prompts)
        params_list = _params_list(sampling_params, SamplingParams, len(prompts))
        params_list = [
            (p or SamplingParams()).clone(output_kind=RequestOutputKind.FINAL_ONLY)
            for p in params_list
        ]
        return self._run_batch(
            [self._prepare(p, sp, None) for p, sp in zip(prompts, params_list)], use_tqdm
        )

    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = False,
        pooling_task: str | None = None,
    ) -> list[PoolingRequestOutput]:
        """Pool every prompt into one vector (`outputs.data`); outputs in input order.

        The engine runs the model's pooling (sentence-transformers config, or CLS for an
        encoder and the last token for a decoder), then `dimensions` and `normalize`.
        Blocks like `generate`.
        """
        _refuse_inside_running_loop("LLM.encode")
        if pooling_task not in (None, "embed"):
            raise ValueError(
                f"pooling_task={pooling_task!r} is not supported; zllm pools each prompt into "
                "one vector ('embed')"
            )
        prompts = _prompt_list(prompts)
        params_list = _params_list(pooling_params, PoolingParams, len(prompts))
        return self._run_batch(
            [
                self._prepare_pooling(p, pp, None, truncate_prompt_tokens)
                for p, pp in zip(prompts, params_list)
            ],
            use_tqdm,
        )

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = False,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (`outputs.embedding`, a list of floats), in input order."""
        outputs = self.encode(
            prompts,
            pooling_params,
            truncate_prompt_tokens=truncate_prompt_tokens,
            use_tqdm=use_tqdm,
            pooling_task="embed",
        )
        return [EmbeddingRequestOutput.from_base(o) for o in outputs]

    def _run_batch(self, prepared: list[Prepared], use_tqdm: bool) -> list[Any]:
        """Send checked requests together; return their final outputs in order.

        Every prompt was checked before any is sent: a bad one costs the others nothing, and
        the whole batch reaches the engine together.
        """
        streams = []
        try:
            with self.client.holding():
                for request in prepared:
                    streams.append(self._submit(request))
            results = []
            for _, stream in tqdm(streams, desc="Processed prompts", disable=not use_tqdm):
                item = stream.get_blocking()
                if isinstance(item, BaseException):
                    raise item
                results.append(item)
            return results
        finally:  # an error or Ctrl-C midway: stop the rest (finished ones are unaffected)
            self.client.abort([rid for rid, _ in streams])

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.processor.chat_prompt(c, add_generation_prompt, **(chat_template_kwargs or {}))
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)

    def _utility(self, method: str, *args: Any) -> Any:
        _refuse_inside_running_loop(f"LLM.{method}")
        return self._call(method, *args).result()

    # ---- health and introspection (vLLM's names) ---------------------------------------------

    def get_tokenizer(self, lora_request: Any = None):
        return self.tokenizer

    def get_model_config(self) -> ModelConfig:
        return self.model_config

    def get_parallel_config(self) -> ParallelConfig:
        return self._parallel_config()

    def get_scheduler_config(self) -> SchedulerConfig:
        return self._scheduler_config()

    def get_decoding_config(self) -> DecodingConfig:
        return DecodingConfig()

    def reset_prefix_cache(self, device: Any = None) -> bool:
        return self._utility("reset_prefix_cache")

    def get_stats(self) -> SchedulerStats:
        return msgspec.convert(self._utility("get_stats"), SchedulerStats)

    def check_health(self) -> None:
        """Raise `EngineDeadError` if engine-core or a worker is gone."""
        self.client.check_alive()
        self._utility("check_health")

    # ---- sleep mode (see `AsyncLLM.sleep`) -----------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Level 1: weights to host memory, KV cache freed; level 2: weights dropped too."""
        check_sleep_args(level=level)
        self._utility("sleep", level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        check_sleep_args(tags=tags)
        self._utility("wake_up", tags)

    def is_sleeping(self) -> bool:
        return self._utility("is_sleeping")

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, str | dict) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
    ):
        return [prompts]
    return list(prompts)


def _params_list(params: Any, kind: type, n: int) -> list[Any]:
    """One params object (or None) per prompt, from one for all or a list of n."""
    if params is None or isinstance(params, kind):
        return [params] * n
    if not isinstance(params, Sequence):
        raise TypeError(f"expected {kind.__name__} or a list of them, got {type(params).__name__}")
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{n} prompts but {len(params)} {kind.__name__} objects")
    return params


def _refuse_inside_running_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{what} blocks until generation finishes, so it cannot run inside a running event loop "
        "on the same thread; use AsyncLLM there, or call it from another thread "
        "(e.g. `await asyncio.to_thread(llm.generate, ...)`)"
    )
