"""`LLM`: the synchronous client for batch generation and chat (vLLM's offline API)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import msgspec

from zllm.frontend.engine_frontend import EngineFrontend
from zllm.frontend.input_processor import PromptType
from zllm.frontend.outputs import RequestOutput
from zllm.protocol.config import EngineArgs
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
        """Run every prompt to completion; outputs come back in input order."""
        _refuse_inside_running_loop("LLM.generate")
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        params_list = [p.clone(output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list]
        streams = []
        try:
            for prompt, params in zip(prompts, params_list):
                streams.append(self._add_request(prompt, params, None))
            results = []
            for _, stream in streams:
                item = stream.get_blocking()
                if isinstance(item, BaseException):
                    raise item
                results.append(item)
            return results
        finally:
            done = {r.request_id for r in locals().get("results", [])}
            self.client.abort([rid for rid, _ in streams if rid not in done])

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
        prompts = []
        for conversation in conversations:
            text = self.processor.apply_chat_template(
                conversation, add_generation_prompt, **(chat_template_kwargs or {})
            )
            prompts.append(
                {
                    "prompt": text,
                    "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False),
                }
            )
        return self.generate(prompts, sampling_params)

    def _utility(self, method: str, *args: Any) -> Any:
        _refuse_inside_running_loop(f"LLM.{method}")
        return self._call(method, *args).result()

    def get_tokenizer(self):
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self._utility("reset_prefix_cache")

    def get_stats(self) -> SchedulerStats:
        return msgspec.convert(self._utility("get_stats"), SchedulerStats)

    def check_health(self) -> None:
        self.client.check_alive()
        self._utility("check_health")

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


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
