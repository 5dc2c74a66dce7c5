"""The BERT encoder family (BertModel: all-MiniLM, BGE, E5, ...): bidirectional attention,
absolute position embeddings, token type embeddings, post-norm layers.

An encoder only pools: each prompt runs whole in one step and attends to itself alone, so
nothing is written to a KV cache. Every token has token type 0 (one text per prompt, as
sentence-transformers encodes it). Checkpoint names are BertModel's, with or without the
`bert.` prefix of the task heads' checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from zllm.protocol.config import ModelConfig
from zllm.worker.checkpoint_tensor import CheckpointTensor
from zllm.worker.layers.encoder_attention import (
    EncoderAttentionMetadata,
    EncoderPass,
    encoder_attention,
)
from zllm.worker.layers.linear import ColumnParallelLinear, RowParallelLinear, tp_size
from zllm.worker.models.interface import Model

_ACTIVATIONS = {
    "gelu": lambda x: nn.functional.gelu(x),
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "relu": nn.functional.relu,
}


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size)
            if config.type_vocab_size
            else None
        )
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertOutput(nn.Module):
    """dense, then LayerNorm of the residual sum (BERT's post-norm)."""

    def __init__(self, input_size: int, config: ModelConfig) -> None:
        super().__init__()
        self.dense = RowParallelLinear(input_size, config.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = tp_size()
        if config.num_attention_heads % size:
            raise ValueError(
                f"{config.num_attention_heads} heads cannot be split over "
                f"tensor_parallel_size={size}"
            )
        self.num_heads = config.num_attention_heads // size
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        self.qkv_proj = ColumnParallelLinear(hidden, [hidden] * 3, bias=True)
        self.output = BertOutput(hidden, config)

    def forward(self, x: torch.Tensor, meta: EncoderAttentionMetadata) -> torch.Tensor:
        o = encoder_attention(self.qkv_proj(x), self.num_heads, meta, self.scale)
        return self.output(o.reshape(x.shape[0], -1), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act {config.hidden_act!r} is not supported ({sorted(_ACTIVATIONS)} are)"
            )
        self.dense = ColumnParallelLinear(config.hidden_size, [config.intermediate_size], bias=True)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, meta: EncoderAttentionMetadata) -> torch.Tensor:
        x = self.attention(x, meta)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])


class BertModel(Model):
    is_causal = False
    uses_kv_cache = False
    stacked = {
        "attention.self.query": ("attention.qkv_proj", 0),
        "attention.self.key": ("attention.qkv_proj", 1),
        "attention.self.value": ("attention.qkv_proj", 2),
    }

    def __init__(self, config: ModelConfig, kernels: str = "torch") -> None:
        # `kernels` picks fused decoder layers; BERT's layers are plain torch on every backend.
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: list[EncoderPass],
    ) -> torch.Tensor:
        """The step's hidden states, pass by pass (a prompt attends to itself alone, so the
        passes are independent: `EncoderAttentionBackend` says why there may be several)."""
        if len(meta) == 1:
            return self._encode(input_ids, positions, meta[0].attention)
        return torch.cat(
            [self._encode(input_ids[p.rows], positions[p.rows], p.attention) for p in meta]
        )

    def _encode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: EncoderAttentionMetadata
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, positions)
        for layer in self.encoder.layer:
            x = layer(x, meta)
        return x

    def load_weight(self, name: str, tensor: CheckpointTensor) -> str | None:
        name = name.removeprefix("bert.")
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight")  # pre-2019 checkpoints
        name = name.replace("LayerNorm.beta", "LayerNorm.bias")
        # Not ours (None): the pooler head (sentence-transformers pools itself), position_ids.
        return self.load_named(name, tensor)
