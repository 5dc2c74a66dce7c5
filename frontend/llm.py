"""`LLM`: the synchronous client for batch generation and chat (vLLM's offline API)."""

from __future__ import annotations

import functools
import logging
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from zllm.frontend.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from zllm.frontend.blocking import check_blocking_call
from zllm.frontend.engine_configs import (
    DecodingConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from zllm.frontend.engine_frontend import EngineFrontend, check_sleep_args
from zllm.frontend.frozen_heap import frozen_heap
from zllm.frontend.input_processor import ProcessedRequest, PromptType
from zllm.frontend.llm_engine import LLMEngine
from zllm.frontend.metrics_reader import Metric, metrics_from_stats
from zllm.frontend.model_config import ModelConfig
from zllm.frontend.outputs import RequestOutput
from zllm.frontend.pooling_outputs import EmbeddingRequestOutput, PoolingRequestOutput
from zllm.frontend.progress import progress_bar
from zllm.frontend.seeding import seed_everything
from zllm.protocol.config import EngineArgs
from zllm.protocol.messages import SchedulerStats
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("zllm")


class LLM(EngineFrontend):
    """`LLM(model=..., **engine_args)`; every `EngineArgs` field is a keyword. `model` is a
    checkpoint directory, a Hugging Face hub id, or None for the default model. `seed=N`
    also seeds this process's `random`, `numpy` and `torch`, as vLLM's in-process engine does."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        engine_args = EngineArgs(model=model, **kwargs)
        if kwargs.get("seed") is not None:
            seed_everything(engine_args.seed)
        super().__init__(engine_args)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLM:
        llm = cls.__new__(cls)
        EngineFrontend.__init__(llm, engine_args)
        return llm

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        `priority`: one per prompt, lower first (the engine needs scheduling_policy="priority").

        Blocks the calling thread. From a thread whose event loop is running (a notebook) it
        blocks that loop too, as vLLM's does, with a one-time warning. Any thread may call it,
        also while other threads run their own loops or generate at the same time.
        `use_tqdm`: a progress bar on stderr (or a tqdm-like class to make one).
        """
        check_blocking_call("LLM.generate", self.client.io_thread)
        _no_lora(lora_request)
        prompts = _prompt_list(prompts)
        params_list = _params_list(sampling_params, SamplingParams, len(prompts))
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(priority)} priorities")
        priorities = iter(priority or [0] * len(prompts))

        def prepare(
            prompt: PromptType, params: SamplingParams | None, text_ids: list[int] | None
        ) -> ProcessedRequest:
            params = _checked(params or SamplingParams(), SamplingParams)
            return self._prepare(
                prompt,
                params.clone(output_kind=RequestOutputKind.FINAL_ONLY),
                None,
                next(priorities),
                text_ids,
            )

        with frozen_heap():  # the prompts' objects are the collector's only work meanwhile
            return self._run_batch(self._each(prepare, prompts, params_list), use_tqdm)

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
        check_blocking_call("LLM.encode", self.client.io_thread)
        if pooling_task not in (None, "embed"):
            raise ValueError(
                f"pooling_task={pooling_task!r} is not supported; zllm pools each prompt into "
                "one vector ('embed')"
            )
        prompts = _prompt_list(prompts)
        params_list = _params_list(pooling_params, PoolingParams, len(prompts))

        def prepare(
            prompt: PromptType, params: PoolingParams | None, text_ids: list[int] | None
        ) -> ProcessedRequest:
            return self._prepare_pooling(
                prompt, params, None, truncate_prompt_tokens, text_ids=text_ids
            )

        with frozen_heap():  # the prompts' objects are the collector's only work meanwhile
            return self._run_batch(self._each(prepare, prompts, params_list), use_tqdm)

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

    def _each(self, prepare: Callable, prompts: list, params_list: list) -> list[ProcessedRequest]:
        """Every request checked before any is sent (a bad one costs the others nothing); an
        error names the prompt's index. The prompts' texts are tokenized in one batch first."""
        text_ids = self.processor.batch_text_ids(prompts)
        prepared = []
        for i, (prompt, params, ids) in enumerate(zip(prompts, params_list, text_ids)):
            try:
                prepared.append(prepare(prompt, params, ids))
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        return prepared

    def _run_batch(self, prepared: list[ProcessedRequest], use_tqdm: bool) -> list[Any]:
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
            with progress_bar(use_tqdm, len(streams), "Processed prompts") as bar:
                for _, stream in streams:
                    item = stream.get_blocking()
                    if isinstance(item, BaseException):
                        raise item
                    results.append(item)
                    bar.update(1)
            return results
        finally:  # an error or Ctrl-C midway: stop the rest (finished ones are unaffected)
            self.client.abort([rid for rid, _ in streams])

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: Any = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template (the tokenizer's, or `chat_template`) to each conversation,
        then generate. `continue_final_message`: the last (assistant) message is continued
        rather than closed; `tools`: tool definitions the template renders."""
        if add_generation_prompt and continue_final_message:
            raise ValueError(
                "continue_final_message=True continues the last message: it needs "
                "add_generation_prompt=False"
            )
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        options = {
            "chat_template": chat_template,
            "continue_final_message": continue_final_message,
            "tools": tools,
            **(chat_template_kwargs or {}),
        }
        prompts = [
            self.processor.chat_prompt(c, add_generation_prompt, **options) for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def beam_search(
        self,
        prompts: Sequence[PromptType],
        params: BeamSearchParams,
        lora_request: Any = None,
        use_tqdm: bool | Callable[..., Any] = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search on the engine's logprobs (`frontend/beam_search.py`); prompts are
        strings or `TextPrompt`/`TokensPrompt` dicts. `concurrency_limit`: prompts searched
        at once (all by default)."""
        _no_lora(lora_request)
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        ids = [self.processor.prompt_token_ids(p) for p in prompts]
        limit = concurrency_limit or max(1, len(ids))
        config = self.model_config
        results: list[BeamSearchOutput] = []
        with progress_bar(
            use_tqdm, params.max_tokens * -(-len(ids) // limit), "Beam search"
        ) as bar:
            for start in range(0, len(ids), limit):
                results += beam_search(
                    lambda batch, sp: self.generate(batch, sp, use_tqdm=False),
                    ids[start : start + limit],
                    params,
                    set(config.eos_token_ids),
                    config.max_model_len,
                    self.tokenizer,
                    on_step=lambda: bar.update(1),
                )
        return results

    @functools.cached_property
    def llm_engine(self) -> LLMEngine:
        """vLLM's `llm.llm_engine`: the step API over this LLM's engine (no second engine)."""
        return LLMEngine(self)

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's recommended sampling defaults (its generation_config.json; see the
        `generation_config` option), else `SamplingParams()`."""
        return SamplingParams.from_optional(**self.model_config.get_diff_sampling_param())

    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> list[Any]:
        """Call a worker method by name on every rank; one result per rank (protocol/rpc.py
        lists the methods). Arguments must be msgspec-encodable: no pickle crosses a socket."""
        check_blocking_call("LLM.collective_rpc", self.client.io_thread)
        return self._collective_rpc(method, args, kwargs).result(timeout)

    def start_profile(self) -> None:
        """Start the torch profiler in every worker; traces go to $ZLLM_TORCH_PROFILER_DIR."""
        self.collective_rpc("start_profile")

    def stop_profile(self) -> None:
        """Stop it; each rank writes its Chrome trace into $ZLLM_TORCH_PROFILER_DIR."""
        for path in self.collective_rpc("stop_profile"):
            logger.info("profiler trace written to %s", path)

    def get_metrics(self) -> list[Metric]:
        """The engine's counters and gauges under vLLM's names (`zllm.v1.metrics.reader`)."""
        return metrics_from_stats(self.get_stats(), self.model_config.model)

    def _utility(self, method: str, *args: Any) -> Any:
        check_blocking_call(f"LLM.{method}", self.client.io_thread)
        return self._call(method, *args).result()

    # ---- health and introspection (vLLM's names) ---------------------------------------------

    def get_tokenizer(self, lora_request: Any = None):
        return self.tokenizer

    def get_model_config(self) -> ModelConfig:
        return self.model_config

    def get_vllm_config(self) -> VllmConfig:
        return self._vllm_config()

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
    if isinstance(prompts, str | dict) or _is_token_list(prompts):
        return [prompts]
    return list(prompts)


def _is_token_list(prompts: object) -> bool:
    """One prompt given as token ids (ints, numpy integers; floats, to be refused), not a batch."""
    if not isinstance(prompts, list | tuple) or not prompts:
        return False
    return isinstance(prompts[0], numbers.Number)


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


def _checked(params: Any, kind: type) -> Any:
    if not isinstance(params, kind):
        raise ValueError(f"expected {kind.__name__}, got {type(params).__name__}")
    return params


def _no_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise NotImplementedError("lora_request is not supported by zllm (no LoRA adapters)")
