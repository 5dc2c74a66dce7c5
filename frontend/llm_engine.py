"""`LLMEngine`: vLLM's synchronous step API (`add_request`, `step`, `has_unfinished_requests`).

A thin wrapper over an `LLM`'s client, not a second engine: the engine-core runs on its own,
so `step()` does not drive it; it returns what the engine produced since the last call,
waiting for at least one output while requests are unfinished. All of this engine's
requests share one output stream, read in arrival order.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from zllm.frontend.blocking import check_blocking_call
from zllm.frontend.errors import EngineDeadError
from zllm.frontend.input_processor import PromptType
from zllm.frontend.outputs import RequestOutput
from zllm.frontend.stream import RequestStream
from zllm.protocol.config import EngineArgs
from zllm.protocol.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from zllm.frontend.llm import LLM


class LLMEngine:
    def __init__(self, llm: LLM, owns_llm: bool = False) -> None:
        """`owns_llm`: this engine is the LLM's only holder (`from_engine_args`); else `llm`
        owns this engine (`llm.llm_engine`) and is held weakly, so `del llm` still frees it."""
        self._llm = llm if owns_llm else weakref.proxy(llm)
        self._stream = RequestStream()
        self._kinds: dict[str, RequestOutputKind] = {}  # unfinished requests -> output kind

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, usage_context: Any = None) -> LLMEngine:
        """`usage_context`: vLLM's telemetry label; zllm sends no telemetry."""
        from zllm.frontend.llm import LLM

        return cls(LLM.from_engine_args(engine_args), owns_llm=True)

    # ---- requests --------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        lora_request: Any = None,
        priority: int = 0,
    ) -> None:
        """Queue a request; its outputs come back from `step()`. Raises `ValueError` for a bad
        one. `priority`: lower first, under scheduling_policy="priority"."""
        if lora_request is not None:
            raise NotImplementedError("lora_request is not supported by zllm (no LoRA adapters)")
        llm = self._llm
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        llm._submit(llm._prepare(prompt, params, request_id, priority), self._stream)
        self._kinds[request_id] = params.output_kind

    def step(self) -> list[RequestOutput]:
        """Every output since the last call (for CUMULATIVE requests, the latest per request);
        waits for at least one while a request is unfinished."""
        check_blocking_call("LLMEngine.step", self._llm.client.io_thread)
        if not self._kinds:
            return []
        items = [self._stream.get_blocking()]
        while True:
            try:
                items.append(self._stream.get_blocking(timeout=0))
            except TimeoutError:
                break
        outputs: dict[int | str, RequestOutput] = {}
        for i, item in enumerate(items):
            if isinstance(item, BaseException):
                self._forget_gone()
                raise item
            kind = self._kinds.get(item.request_id)
            if item.finished:
                self._kinds.pop(item.request_id, None)
            key = i if kind == RequestOutputKind.DELTA else item.request_id
            outputs.pop(key, None)  # a later output goes after the others
            outputs[key] = item
        return list(outputs.values())

    def abort_request(self, request_id: str | list[str]) -> None:
        """Stop requests; each ends with a `finish_reason="abort"` output from `step()`."""
        self._llm.client.abort([request_id] if isinstance(request_id, str) else list(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._kinds)

    def get_num_unfinished_requests(self) -> int:
        return len(self._kinds)

    def _forget_gone(self) -> None:
        """After an error: drop the requests the client no longer runs (refused, or all if
        the engine died), so `has_unfinished_requests` cannot promise outputs that never come."""
        client = self._llm.client
        if client.dead_error is not None:
            self._kinds.clear()
        for request_id in [r for r in self._kinds if r not in client.registry]:
            del self._kinds[request_id]

    # ---- the LLM's views -------------------------------------------------------------------

    @property
    def model_config(self):
        return self._llm.get_model_config()

    @property
    def vllm_config(self):
        return self._llm.get_vllm_config()

    @property
    def tokenizer(self):
        return self._llm.get_tokenizer()

    def get_model_config(self):
        return self._llm.get_model_config()

    def get_vllm_config(self):
        return self._llm.get_vllm_config()

    def get_tokenizer(self, lora_request: Any = None):
        return self._llm.get_tokenizer(lora_request)

    def reset_prefix_cache(self, device: Any = None) -> bool:
        return self._llm.reset_prefix_cache(device)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None) -> list[Any]:
        return self._llm.collective_rpc(method, timeout, args, kwargs)

    def get_metrics(self):
        return self._llm.get_metrics()

    def shutdown(self) -> None:
        try:
            self._llm.shutdown()
        except ReferenceError:  # the LLM that owned this engine is gone, and its engine with it
            raise EngineDeadError("the LLM this engine belongs to was deleted") from None
