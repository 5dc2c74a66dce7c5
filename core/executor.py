"""How engine-core reaches its workers: the interface, and which implementation to use."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.worker_messages import ExecuteModel, ModelOutput


class WorkerDiedError(RuntimeError):
    """A worker process exited or reported a failure; the engine cannot go on."""


class Executor(ABC):
    num_kv_blocks: int
    # The workers run while engine-core goes on (processes): overlap has something to hide.
    runs_concurrently: bool = True

    @abstractmethod
    def submit(self, step: ExecuteModel) -> None:
        """Send a step to every rank without waiting for it."""

    @abstractmethod
    def get_output(self) -> ModelOutput:
        """The results of the oldest step submitted and not yet returned (waiting for them;
        a step that takes longer than `step_timeout` is a `WorkerDiedError`)."""

    @abstractmethod
    def collective_rpc(
        self,
        method: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """Call a worker method on every rank; return each rank's result. A rank that does not
        answer within `timeout_s` (default: `step_timeout`) is a `WorkerDiedError`."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise `WorkerDiedError` if a worker process is gone (cheap: no message)."""

    @abstractmethod
    def ping(self, timeout_s: float) -> None:
        """Raise `WorkerDiedError` unless every rank answers within `timeout_s`."""

    @abstractmethod
    def shutdown(self) -> None: ...


def create_executor(engine_args: EngineArgs, model_config: ModelConfig) -> Executor:
    if engine_args.distributed_executor_backend == "uni":
        from zllm.core.uniproc_executor import UniprocExecutor

        return UniprocExecutor(engine_args, model_config)
    from zllm.core.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor(engine_args, model_config)
