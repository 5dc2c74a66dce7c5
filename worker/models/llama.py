"""The Llama family: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm); tied or untied embeddings.

Tokens of all sequences in a step are one flat batch `[T, hidden]`; attention finds each
sequence's context through the attention metadata and the paged KV cache. `kernels="triton"`
runs the fused layers (RMSNorm + residual add, SiLU·mul) as Triton kernels, and hands the
rotary tables to the attention backend (its Triton cache write rotates q and k).
The LM head is built only when the engine generates: an embedding engine (or a `*Model`
checkpoint, which has no head) pools the hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from zllm.protocol.config import ModelConfig
from zllm.worker.checkpoint_tensor import CheckpointTensor
from zllm.worker.layers.attention import AttentionMetadata
from zllm.worker.layers.linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_vocab,
    tp_size,
    vocab_logits,
)
from zllm.worker.layers.norm import RMSNorm
from zllm.worker.layers.rotary import RotaryEmbedding
from zllm.worker.models.interface import Model


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, fused: bool) -> None:
        super().__init__()
        size = tp_size()
        if config.num_attention_heads % size or config.num_key_value_heads % size:
            raise ValueError(
                f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads "
                f"cannot be split over tensor_parallel_size={size}"
            )
        self.num_heads = config.num_attention_heads // size
        self.num_kv_heads = config.num_key_value_heads // size
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [q_size, kv_size, kv_size], config.attention_bias, fused
        )
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, fused=fused)
        self.rotary = rotary
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, fused)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, fused)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(
            [
                self.num_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
            ],
            dim=-1,
        )
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o = meta.attend(q, k, v, kv_cache, self.scale, self.rotary, positions)
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size, config.intermediate_size],
            bias=False,
            fused=fused,
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, fused=fused
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused:
            from zllm.worker.kernels.activation import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, fused: bool) -> None:
        super().__init__()
        self.self_attn = Attention(config, rotary, fused)
        self.mlp = MLP(config, fused)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the next norm
        adds the two, fused with its normalisation."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, fused: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
        )
        self.layers = nn.ModuleList(
            [DecoderLayer(config, rotary, fused) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)


class LlamaForCausalLM(Model):
    is_causal = True
    uses_kv_cache = True
    stacked = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, kernels: str = "torch") -> None:
        super().__init__()
        self.config = config
        self.fused = kernels == "triton"
        self.model = LlamaModel(config, self.fused)
        self.generates = "generate" in config.supported_tasks
        if config.tie_word_embeddings or not self.generates:
            self.lm_head = None
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def can_generate(self) -> bool:
        return self.generates

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm."""
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, positions, kv_cache, meta)
        return self.model.norm(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if not self.generates:
            return super().logits(hidden)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return gather_vocab(vocab_logits(hidden, weight, self.fused), self.config.vocab_size)

    def load_weight(self, name: str, tensor: CheckpointTensor) -> str | None:
        if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
            return None
        if not name.startswith(("model.", "lm_head.")):  # a bare `*Model` checkpoint
            name = f"model.{name}"
        return self.load_named(name, tensor)
