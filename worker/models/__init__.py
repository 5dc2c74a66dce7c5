"""Model architectures, by the name in a checkpoint's config.json `architectures`.

Every family implements `interface.Model`; `*Model` decoder checkpoints (no LM head) load into
the same class as their `*ForCausalLM` siblings and only pool.
"""

from __future__ import annotations

from zllm.worker.models.bert import BertModel
from zllm.worker.models.interface import Model
from zllm.worker.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[Model]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "LlamaModel": LlamaForCausalLM,
    "MistralModel": LlamaForCausalLM,
    "Qwen2Model": LlamaForCausalLM,
    "Qwen3Model": LlamaForCausalLM,
    "BertModel": BertModel,
}


def model_class(architecture: str) -> type[Model]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(
            f"unknown architecture {architecture!r}; zllm supports {supported}"
        ) from None
