"""The worker inside engine-core: no process boundary (to measure what that boundary costs)."""

from __future__ import annotations

from typing import Any

from zllm.core.executor import Executor
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.worker_messages import ExecuteModel, ModelOutput


class UniprocExecutor(Executor):
    def __init__(self, engine_args: EngineArgs, model_config: ModelConfig) -> None:
        from zllm.worker.worker import Worker

        self.worker = Worker(engine_args, model_config)
        self.num_kv_blocks = self.worker.init_kv_cache(self.worker.available_kv_blocks())

    def execute_model(self, step: ExecuteModel) -> ModelOutput:
        return self.worker.execute_model(step)

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
