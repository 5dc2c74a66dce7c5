"""The worker inside engine-core: no process boundary (to measure what that boundary costs)."""

from __future__ import annotations

from collections import deque
from typing import Any

from zllm.core.executor import Executor
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.worker_messages import ExecuteModel, ModelOutput


class UniprocExecutor(Executor):
    runs_concurrently = False  # a step runs inside `submit`: there is nothing to overlap

    def __init__(self, engine_args: EngineArgs, model_config: ModelConfig) -> None:
        from zllm.worker.worker import Worker

        self.worker = Worker(engine_args, model_config)
        self.num_kv_blocks = self.worker.init_kv_cache(self.worker.available_kv_blocks())
        self.outputs: deque[ModelOutput] = deque()

    def submit(self, step: ExecuteModel) -> None:
        self.outputs.append(self.worker.execute_model(step))  # nothing to overlap with here

    def get_output(self) -> ModelOutput:
        return self.outputs.popleft()

    def collective_rpc(
        self,
        method: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        return [self.worker.call(method, list(args), kwargs)]

    def check_health(self) -> None:
        pass  # the worker is this process: if it stopped, so did we

    def ping(self, timeout_s: float) -> None:
        pass

    def shutdown(self) -> None:
        self.worker.shutdown()
