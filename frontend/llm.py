"""`LLM`: the synchronous client for batch generation and chat (vLLM's offline API)."""

from __future__ import annotations

import asyncio
import numbers
from collections.abc import Sequence
from typing import Any

import msgspec

from zllm.frontend.engine_configs import DecodingConfig, ParallelConfig, SchedulerConfig
from zllm.frontend.engine_frontend import EngineFrontend, check_sleep_args
from zllm.frontend.input_processor import PromptType
from zllm.frontend.outputs import RequestOutput
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.messages import SchedulerStats
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
        if isinstance(prompts, str | dict) or _is_token_list(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        # Every prompt is checked before any is sent: a bad one costs the others nothing, and
        # the whole batch reaches the engine together.
        prepared = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                if not isinstance(params, SamplingParams):
                    raise ValueError(
                        f"sampling_params must be SamplingParams, got {type(params).__name__}"
                    )
                params = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
                prepared.append(self._prepare(prompt, params, None))
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        streams = []
        try:
            with self.client.holding():
                for request in prepared:
                    streams.append(self._submit(request))
            results = []
            for _, stream in streams:
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


def _is_token_list(prompts: object) -> bool:
    """One prompt given as token ids (ints, numpy integers; floats, to be refused), not a batch."""
    if not isinstance(prompts, list | tuple) or not prompts:
        return False
    return isinstance(prompts[0], numbers.Number)


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
