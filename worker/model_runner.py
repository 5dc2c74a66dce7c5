"""Turns a scheduled step into tensors, runs the model, samples, and keeps per-request state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zllm.protocol.config import ModelConfig
from zllm.protocol.messages import Logprobs
from zllm.protocol.sampling_params import SamplingParams
from zllm.protocol.worker_messages import ExecuteModel, ModelOutput
from zllm.worker.layers.attention import AttentionMetadata
from zllm.worker.sampler import Sampler, SamplingRequest


@dataclass
class RequestState:
    """What a worker remembers about a request between steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, config: ModelConfig, device: torch.device, block_size: int
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.block_size = block_size
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler(config.vocab_size, device)
        self.requests: dict[str, RequestState] = {}

    # ---- KV cache ------------------------------------------------------------------------------

    def kv_bytes_per_block(self, num_kv_heads: int) -> int:
        dtype = next(self.model.parameters()).dtype
        per_layer = 2 * self.block_size * num_kv_heads * self.config.head_dim * dtype.itemsize
        return per_layer * self.config.num_hidden_layers

    def allocate_kv_cache(self, num_blocks: int, num_kv_heads: int) -> None:
        dtype = next(self.model.parameters()).dtype
        shape = (2, num_blocks, self.block_size, num_kv_heads, self.config.head_dim)
        # zeros, not empty: masked-out keys must be finite or they poison the softmax.
        self.kv_caches = [
            torch.zeros(shape, dtype=dtype, device=self.device)
            for _ in range(self.config.num_hidden_layers)
        ]

    def free_kv_cache(self) -> None:
        self.kv_caches = []

    # ---- one step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, step: ExecuteModel) -> ModelOutput:
        for key in step.finished_request_ids:
            self.requests.pop(key, None)
        for new in step.new_requests:
            generator = None
            if new.sampling_params.seed is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(new.sampling_params.seed)
            self.requests[new.request_id] = RequestState(
                new.sampling_params, new.prompt_token_ids, generator=generator
            )

        input_ids: list[int] = []
        positions: list[int] = []
        meta_chunks = []
        sample_rows: list[int] = []
        sample_keys: list[str] = []
        for chunk in step.chunks:
            n = len(chunk.token_ids)
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + n))
            meta_chunks.append((chunk.start, n, chunk.block_ids))
            if chunk.sample:
                sample_rows.append(len(input_ids) - 1)
                sample_keys.append(chunk.request_id)

        meta = AttentionMetadata.build(meta_chunks, self.block_size, self.device)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids_t, pos_t, self.kv_caches, meta)
        if not sample_keys:
            return ModelOutput(request_ids=[], sampled_token_ids=[])
        logits = self.model.logits(hidden[torch.tensor(sample_rows, device=self.device)])
        states = [self.requests[k] for k in sample_keys]
        rows = [
            SamplingRequest(
                s.params,
                s.prompt_token_ids,
                s.output_token_ids,
                s.generator,
                self.config.eos_token_ids,
            )
            for s in states
        ]
        out = self.sampler(logits, rows)
        token_ids = out.token_ids.tolist()  # the one host sync of the step
        for state, token in zip(states, token_ids):
            state.output_token_ids.append(token)
        logprobs: list[Logprobs | None] = []
        if out.logprobs is not None:
            logprobs = [
                _top_logprobs(out.logprobs[i], token_ids[i], s.params.logprobs)
                if s.params.logprobs is not None
                else None
                for i, s in enumerate(states)
            ]
        return ModelOutput(request_ids=sample_keys, sampled_token_ids=token_ids, logprobs=logprobs)


def _top_logprobs(row: torch.Tensor, chosen: int, k: int) -> Logprobs:
    """The chosen token's logprob and rank, then the top-k (vLLM's shape)."""
    chosen_lp = row[chosen]
    rank = int((row > chosen_lp).sum().item()) + 1
    ids = [chosen]
    lps = [float(chosen_lp)]
    if k > 0:
        top = row.topk(k)
        ids += top.indices.tolist()
        lps += top.values.tolist()
    return Logprobs(token_ids=[ids], logprobs=[lps], ranks=[rank])
