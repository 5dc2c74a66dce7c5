"""What `encode` and `embed` return: vLLM's `PoolingRequestOutput` and `EmbeddingRequestOutput`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:  # the frontend imports torch only once a vector arrives
    import torch

    from zllm.frontend.outputs import RequestMetrics


@dataclass
class PoolingOutput:
    data: torch.Tensor  # the pooled vector, float32


_O = TypeVar("_O")


class PoolingRequestOutput(Generic[_O]):
    def __init__(
        self,
        request_id: str,
        outputs: _O,
        prompt_token_ids: list[int],
        finished: bool,
        num_cached_tokens: int = 0,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self.request_id = request_id
        self.outputs = outputs
        self.prompt_token_ids = prompt_token_ids
        self.finished = finished
        self.num_cached_tokens = num_cached_tokens
        self.metrics = metrics  # arrival, finish and queue times

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(request_id={self.request_id!r}, outputs={self.outputs!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, "
            f"num_cached_tokens={self.num_cached_tokens}, finished={self.finished})"
        )


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @staticmethod
    def from_base(output: PoolingOutput) -> EmbeddingOutput:
        if output.data.ndim != 1:
            raise ValueError("pooled data should be a 1-D embedding vector")
        return EmbeddingOutput(output.data.tolist())

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)

    def __repr__(self) -> str:
        return f"EmbeddingOutput(hidden_size={self.hidden_size})"


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    @staticmethod
    def from_base(output: PoolingRequestOutput[PoolingOutput]) -> EmbeddingRequestOutput:
        return EmbeddingRequestOutput(
            request_id=output.request_id,
            outputs=EmbeddingOutput.from_base(output.outputs),
            prompt_token_ids=output.prompt_token_ids,
            finished=output.finished,
            num_cached_tokens=output.num_cached_tokens,
        )
