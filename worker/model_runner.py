"""Turns a scheduled step into tensors, runs the model, samples (or pools), and keeps
per-request state."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from zllm.protocol.config import ModelConfig
from zllm.protocol.messages import Logprobs
from zllm.protocol.sampling_params import SamplingParams
from zllm.protocol.worker_messages import ExecuteModel, ModelOutput
from zllm.worker import transfer
from zllm.worker.layers.attention import AttentionBackend, TorchAttentionBackend
from zllm.worker.models.interface import Model
from zllm.worker.pooler import Pooler, PoolingChunk
from zllm.worker.sampler import Sampler, SamplingRequest, gather_logprobs

PROMPT_LOGPROBS_ROWS = 512  # prompt positions per logits matmul: bounds the [rows, V] buffer


@dataclass
class RequestState:
    """What a worker remembers about a request between steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    next_prompt_logprob: int = 1  # first prompt position whose logprob is still owed


@dataclass
class _PromptRows:
    """Hidden rows of one chunk that predict prompt tokens."""

    key: str
    first_row: int
    targets: list[int]  # the prompt tokens those rows predict
    k: int
    targets_t: torch.Tensor | None = None  # on the device, copied before the forward


class ModelRunner:
    def __init__(
        self,
        model: Model,
        config: ModelConfig,
        device: torch.device,
        block_size: int,
        attn_backend: AttentionBackend | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.block_size = block_size
        self.attn_backend = attn_backend or TorchAttentionBackend(block_size, device)
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler(
            config.vocab_size, device, fused_argmax=self.attn_backend.name == "triton"
        )
        self.requests: dict[str, RequestState] = {}
        self.pooler = Pooler(config.pooler_config, device) if config.pooler_config else None

    # ---- KV cache ------------------------------------------------------------------------------

    def kv_bytes_per_block(self, num_kv_heads: int) -> int:
        dtype = next(self.model.parameters()).dtype
        per_layer = 2 * self.block_size * num_kv_heads * self.config.head_dim * dtype.itemsize
        return per_layer * self.config.num_hidden_layers

    def allocate_kv_cache(self, num_blocks: int, num_kv_heads: int) -> None:
        if not self.model.uses_kv_cache:  # its blocks are only the scheduler's accounting
            return
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
            if self.pooler is not None:
                self.pooler.drop(key)
        for new in step.new_requests:
            if new.pooling_params is not None:
                self._require_pooler().add(
                    new.request_id, new.pooling_params, len(new.prompt_token_ids)
                )
                continue
            generator = None
            if new.sampling_params.seed is not None and not new.sampling_params.greedy:
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
        prompt_rows: list[_PromptRows] = []
        pool_chunks: list[PoolingChunk] = []
        for chunk in step.chunks:
            n = len(chunk.token_ids)
            state = self.requests.get(chunk.request_id)
            if state is not None and state.params.prompt_logprobs is not None:
                rows = self._plan_prompt_logprobs(state, chunk.request_id, chunk.start, n)
                if rows is not None:
                    rows.first_row += len(input_ids)
                    prompt_rows.append(rows)
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + n))
            meta_chunks.append((chunk.start, n, chunk.block_ids))
            if self.pooler is not None and chunk.request_id in self.pooler:
                pool_chunks.append(
                    PoolingChunk(chunk.request_id, len(input_ids) - n, n, chunk.start, chunk.sample)
                )
            elif chunk.sample:
                sample_rows.append(len(input_ids) - 1)
                sample_keys.append(chunk.request_id)

        # Host->device copies are queued without waiting; device->host copies are queued
        # too, and complete when the sampled ids reach the host: one wait per step.
        to_device = functools.partial(transfer.to_device, device=self.device)
        meta = self.attn_backend.build_metadata(meta_chunks)
        ids_t = to_device(input_ids, torch.long)
        pos_t = to_device(positions, torch.long)
        sample_t = to_device(sample_rows, torch.long)
        for rows in prompt_rows:
            rows.targets_t = to_device(rows.targets, torch.long)
        hidden = self.model(ids_t, pos_t, self.kv_caches, meta)
        prompt_parts = {rows.key: self._prompt_logprobs(hidden, rows) for rows in prompt_rows}
        pooled = self.pooler.pool(hidden, pool_chunks) if pool_chunks else {}
        sampled: list[int] = []
        logprobs: list[Logprobs | None] = []
        if sample_keys:
            states = [self.requests[k] for k in sample_keys]
            logits = self.model.logits(hidden[sample_t])
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
            gathered = self._gather_sample_logprobs(out.logprobs, out.token_ids, states)
            sampled = out.token_ids.tolist()  # the step's wait for the device
            for state, token in zip(states, sampled):
                state.output_token_ids.append(token)
            if gathered is not None:
                logprobs = _split(gathered, [s.params.logprobs for s in states], self._top_k)
        # Each chunk's prompt logprobs go out with its own step: what a step ships is bounded by
        # the step's size, never by the prompt's.
        if prompt_parts and not sample_keys and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # no sampled ids to wait on
        prompt_logprobs = {key: _to_logprobs(parts) for key, parts in prompt_parts.items()}
        return ModelOutput(
            request_ids=sample_keys,
            sampled_token_ids=sampled,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            pooled=pooled,
        )

    def _require_pooler(self) -> Pooler:
        if self.pooler is None:
            raise ValueError("a pooling request reached an engine that does not pool")
        return self.pooler

    # ---- logprobs ------------------------------------------------------------------------------

    def _top_k(self, k: int) -> int:
        return self.config.vocab_size if k == -1 else min(k, self.config.vocab_size)

    def _gather_sample_logprobs(
        self, raw: torch.Tensor | None, token_ids: torch.Tensor, states: list[RequestState]
    ) -> tuple[torch.Tensor, ...] | None:
        """Chosen token + top-k of the raw distribution for the whole batch, on the device."""
        if raw is None:
            return None
        k_max = max(self._top_k(s.params.logprobs) for s in states if s.params.logprobs is not None)
        return transfer.to_host(gather_logprobs(raw, token_ids, k_max))

    def _plan_prompt_logprobs(
        self, state: RequestState, key: str, start: int, n: int
    ) -> _PromptRows | None:
        """Rows of this chunk whose next token is a prompt token not yet scored.

        Position p predicts prompt token p + 1; a recomputed chunk (after preemption)
        scores nothing twice.
        """
        prompt = state.prompt_token_ids
        first = max(start, state.next_prompt_logprob - 1)
        end = min(start + n, len(prompt) - 1)
        if first >= end:
            return None
        state.next_prompt_logprob = end + 1
        return _PromptRows(
            key=key,
            first_row=first - start,
            targets=prompt[first + 1 : end + 1],
            k=self._top_k(state.params.prompt_logprobs),
        )

    def _prompt_logprobs(
        self, hidden: torch.Tensor, rows: _PromptRows
    ) -> list[tuple[torch.Tensor, ...]]:
        """Chosen + top-k logprobs of the rows predicting prompt tokens, left on the device."""
        targets = rows.targets_t
        parts = []
        for lo in range(0, len(rows.targets), PROMPT_LOGPROBS_ROWS):
            hi = min(lo + PROMPT_LOGPROBS_ROWS, len(rows.targets))
            h = hidden[rows.first_row + lo : rows.first_row + hi]
            logprobs = torch.log_softmax(self.model.logits(h).float(), dim=-1)
            parts.append(transfer.to_host(gather_logprobs(logprobs, targets[lo:hi], rows.k)))
        return parts


def _split(
    gathered: tuple[torch.Tensor, ...], ks: list[int | None], top_k
) -> list[Logprobs | None]:
    """One row per request, trimmed to the k it asked for (None: it asked for none)."""
    ids, values, ranks = (t.tolist() for t in gathered)
    out: list[Logprobs | None] = []
    for i, k in enumerate(ks):
        if k is None:
            out.append(None)
            continue
        width = 1 + top_k(k)
        out.append(
            Logprobs(token_ids=[ids[i][:width]], logprobs=[values[i][:width]], ranks=[ranks[i]])
        )
    return out


def _to_logprobs(parts: list[tuple[torch.Tensor, ...]]) -> Logprobs:
    out = Logprobs(token_ids=[], logprobs=[], ranks=[])
    for ids, values, ranks in parts:
        out.token_ids.extend(ids.tolist())
        out.logprobs.extend(values.tolist())
        out.ranks.extend(ranks.tolist())
    return out
