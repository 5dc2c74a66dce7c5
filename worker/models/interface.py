"""What the model runner needs from a model family (Llama's decoders, BERT's encoders).

A family turns a flat batch of tokens into hidden states (`forward`), fills itself from a
checkpoint one tensor at a time (`load_weight`), and says how its attention works: causal
with a paged KV cache kept across steps, or bidirectional within the step. Generation reads
`logits` of the hidden states; pooling (`worker/pooler.py`) reads the hidden states alone, so
every family can embed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from zllm.worker.checkpoint_tensor import CheckpointTensor
from zllm.worker.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


class Model(nn.Module, ABC):
    # Each token attends only to earlier ones: KV may be cached and prompts chunked.
    is_causal: ClassVar[bool]
    # Keeps K/V in the paged cache between steps (False: attention within the step only).
    uses_kv_cache: ClassVar[bool]
    # checkpoint name fragment -> (our parameter fragment, part index in a stacked layer)
    stacked: ClassVar[dict[str, tuple[str, int]]] = {}

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: Any,
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` of the last layer (after its norm)."""

    @property
    def can_generate(self) -> bool:
        return False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits `[rows, vocab]` of hidden rows (models with an LM head), in the model's
        dtype (a greedy argmax needs no float32 copy; the sampler makes one), on rank 0; None
        on the other tensor-parallel ranks (every rank must call it: it gathers)."""
        raise ValueError(f"{type(self).__name__} has no LM head: it cannot generate")

    @abstractmethod
    def load_weight(self, name: str, tensor: CheckpointTensor) -> str | None:
        """Copy one checkpoint tensor into place (reading only this rank's slice).

        Returns the parameter it filled (`name#part` for the later parts of a stacked
        layer), or None for tensors the model does not use.
        """

    def load_named(self, name: str, tensor: CheckpointTensor) -> str | None:
        """`load_weight` for a checkpoint name already in this model's naming: into its part of
        a stacked layer, into the parameter of that name, or nowhere (None)."""
        if not hasattr(self, "_params"):
            self._params = dict(self.named_parameters())
        for fragment, (target, part) in self.stacked.items():
            if f".{fragment}." in name:
                return self._copy(name.replace(fragment, target), tensor, part)
        return self._copy(name, tensor) if name in self._params else None

    def _copy(self, param_name: str, tensor: CheckpointTensor, part: int = 0) -> str:
        """Put `tensor` into parameter `param_name` (part `part` of a stacked layer), reading
        only this rank's slice for a tensor-parallel layer."""
        param = self._params[param_name]
        module = self.get_submodule(param_name.rsplit(".", 1)[0])
        if isinstance(module, ColumnParallelLinear | RowParallelLinear | VocabParallelEmbedding):
            module.load(param, tensor, part)
        else:
            if tuple(param.shape) != tensor.shape:
                raise ValueError(
                    f"{param_name}: checkpoint shape {tensor.shape} != model shape "
                    f"{tuple(param.shape)}"
                )
            param.data.copy_(tensor.full())
        return f"{param_name}#{part}" if part else param_name
