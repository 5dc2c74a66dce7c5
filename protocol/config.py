"""Engine configuration: what the user asks for (`EngineArgs`) and what the model is (`ModelConfig`).

Both cross process boundaries (frontend -> engine-core -> workers), so they are
msgspec Structs: the core receives the exact arguments the user passed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec

from zllm.protocol.pooler_config import (
    PoolerConfig,
    read_pooler_config,
    sentence_transformers_max_len,
)
from zllm.protocol.vllm_options import check_vllm_options

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
LOAD_FORMATS = ("auto", "safetensors", "dummy")
SCHEDULING_POLICIES = ("fcfs", "priority")

RUNNERS = ("auto", "generate", "pooling")
TASKS = ("auto", "generate", "embed")
_TASK_RUNNER = {"auto": "auto", "generate": "generate", "embed": "pooling"}
# Bidirectional attention: every token sees the whole prompt, so nothing is cached or chunked.
ENCODER_ARCHITECTURES = frozenset({"BertModel"})
# Default step token budgets (vLLM's): 2048 balances a generating engine's inter-token latency
# against time to first token; an engine that only pools has no inter-token latency to protect,
# so it takes much larger steps (vLLM's POOLING_MODEL_MAX_NUM_BATCHED_TOKENS).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
POOLING_MAX_NUM_BATCHED_TOKENS = 32768


# EngineArgs fields that only a client of a `zllm engine-core` daemon uses, with defaults.
DAEMON_CLIENT_OPTIONS: dict[str, Any] = {
    "heartbeat_timeout": 30.0,
    "curve_secret_key": None,
    "curve_server_key": None,
}


class EngineArgs(msgspec.Struct, kw_only=True):
    """Every engine option, as keywords (vLLM's names)."""

    model: str | None = None  # None or "smollm2-135m-instruct" -> the default model
    tokenizer: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    # Which replica of a model this engine is (`zllm serve --replicas`): its ranks take GPUs
    # [r * tensor_parallel_size, (r + 1) * tensor_parallel_size). Replicas on the CPU share it.
    data_parallel_rank: int = 0
    distributed_executor_backend: str = "mp"  # "mp": one worker process per rank; "uni": in-process
    # False: decode steps on CUDA replay CUDA graphs captured at start-up (worker/cuda_graphs.py)
    enforce_eager: bool = False
    load_format: str = "auto"  # "auto"/"safetensors": the checkpoint; "dummy": random weights
    trust_remote_code: bool = False  # passed to transformers: the tokenizer, `hf_config`
    engine_core_address: str | None = (
        None  # connect to a running `zllm engine-core` instead of spawning one
    )
    # A daemon's client: how long the daemon may be silent (ZMTP heartbeats unanswered: a
    # stopped or unreachable process) before in-flight requests fail and the client
    # reconnects. A daemon that died, or refuses connections, fails them at once.
    heartbeat_timeout: float = 30.0
    # A daemon's client over CurveZMQ: this client's secret key file and the daemon's public
    # key file (`zllm keys generate`).
    curve_secret_key: str | None = None
    curve_server_key: str | None = None
    disable_log_stats: bool = True  # False: `AsyncLLM.do_log_stats()` logs a line of stats
    skip_tokenizer_init: bool = False
    # Bounds: what one request, or many, may cost the engine.
    max_logprobs: int = 20  # cap on logprobs / prompt_logprobs (vLLM's default); -1: no cap
    max_queued_requests: int | None = None  # waiting requests beyond this are refused (overload)
    step_timeout: float = 300.0  # seconds a step may take before the workers count as stuck
    # "fcfs": arrival order; "priority": lowest `priority` first (core/request_queue.py)
    scheduling_policy: str = "fcfs"
    # Schedule step N+1 while the workers run step N (vLLM's name); False: one step at a time.
    async_scheduling: bool = True

    # ---- vLLM's options that appear in its examples (docs/vllm-compat.md). Each works or is
    # refused here, naming itself: `check_vllm_options` in protocol/vllm_options.py.
    revision: str | None = None  # hub ids: branch, tag or commit
    tokenizer_revision: str | None = None
    download_dir: str | None = None  # hub ids: the Hugging Face cache to use
    hf_token: str | bool | None = None  # hub ids: token, or True for the stored login
    tokenizer_mode: str = "auto"  # "auto" | "hf" (fast tokenizer when there is one)
    generation_config: str = "auto"  # "auto": the model's | "vllm": none | a folder
    override_generation_config: dict[str, Any] | None = None
    swap_space: float = 4  # GiB; preemption recomputes, so no swap is ever used
    enable_sleep_mode: bool = False  # sleep mode is always available in zllm
    quantization: str | None = None  # unquantized checkpoints only
    kv_cache_dtype: str = "auto"  # the model's dtype only
    # No torch.compile: None, 0, {"level": 0}; {"cudagraph_capture_sizes": [1, 2, 4]} chooses
    # the decode batch sizes captured in CUDA graphs.
    compilation_config: int | dict[str, Any] | None = None
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    cpu_offload_gb: float = 0
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    speculative_config: dict[str, Any] | None = None

    # "generate": only generate(); "pooling": only encode()/embed(); "auto": what the
    # checkpoint can do (an encoder pools; a decoder with an LM head does both).
    runner: str = "auto"
    task: str = "auto"  # vLLM's older name for the same choice: "generate" or "embed"

    def __post_init__(self) -> None:
        check_vllm_options(self)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.data_parallel_rank < 0:
            raise ValueError(f"data_parallel_rank must be >= 0, got {self.data_parallel_rank}")
        if self.distributed_executor_backend not in ("mp", "uni"):
            raise ValueError(
                "distributed_executor_backend must be 'mp' or 'uni', "
                f"got {self.distributed_executor_backend!r}"
            )
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(
                "distributed_executor_backend='uni' runs one rank; use 'mp' for tensor parallelism"
            )
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (no cap) or >= 0, got {self.max_logprobs}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(
                f"max_queued_requests must be None or >= 0, got {self.max_queued_requests}"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {SCHEDULING_POLICIES}, "
                f"got {self.scheduling_policy!r}"
            )
        if not self.heartbeat_timeout > 0:
            raise ValueError(f"heartbeat_timeout must be > 0 seconds, got {self.heartbeat_timeout}")
        if (self.curve_secret_key is None) != (self.curve_server_key is None):
            raise ValueError(
                "curve_secret_key and curve_server_key go together (this client's secret key "
                "file and the daemon's public key file)"
            )
        if self.engine_core_address is None:
            for name, default in DAEMON_CLIENT_OPTIONS.items():
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name} is an option of a daemon's client: it needs engine_core_address"
                    )
        if not self.step_timeout > 0:
            raise ValueError(f"step_timeout must be > 0 seconds, got {self.step_timeout}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if "auto" not in (self.runner, self.task) and _TASK_RUNNER[self.task] != self.runner:
            raise ValueError(f"task={self.task!r} contradicts runner={self.runner!r}")

    def resolved_runner(self) -> str:
        """The runner asked for by `runner` or `task`: "generate", "pooling" or "auto"."""
        return self.runner if self.runner != "auto" else _TASK_RUNNER[self.task]

    @classmethod
    def add_cli_args(cls, parser: Any) -> Any:
        """vLLM's `EngineArgs.add_cli_args`: one `--kebab-case` option per field; returns `parser`."""
        from zllm.frontend.cli import add_engine_args

        add_engine_args(parser)
        return parser

    @classmethod
    def from_cli_args(cls, args: Any) -> EngineArgs:
        """The options given on the command line (`argparse.Namespace`), as this class."""
        from zllm.frontend.cli import engine_args_from

        return engine_args_from(args, cls)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device.startswith("cuda") else "float32"

    def resolved_max_num_batched_tokens(
        self, max_model_len: int, pooling_only: bool = False
    ) -> int:
        """`max_num_batched_tokens`, else vLLM's default: 2048 (at least `max_model_len` without
        chunked prefill), raised to 32768 for an engine that only pools (`pooling_only`, see
        `ModelConfig.pooling_only`): many short prompts then share a step instead of ~25."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS
        if not self.enable_chunked_prefill:
            tokens = max(max_model_len, tokens)
        if pooling_only:
            tokens = max(tokens, POOLING_MAX_NUM_BATCHED_TOKENS)
        return tokens


class AsyncEngineArgs(EngineArgs, kw_only=True):
    """The same options, for `AsyncLLM.from_engine_args` (vLLM keeps two names)."""


class ModelConfig(msgspec.Struct, kw_only=True):
    """What the engine knows of a checkpoint, read from its `config.json` (no transformers needed)."""

    path: str
    tokenizer: str
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    eos_token_ids: list[int]
    max_model_len: int
    dtype: str = "float32"
    supported_tasks: list[str] = msgspec.field(default_factory=lambda: ["generate"])  # and "embed"
    is_causal: bool = True  # False: bidirectional attention (an encoder)
    pooler_config: PoolerConfig | None = None  # how "embed" pools, when supported
    layer_norm_eps: float = 1e-12  # encoders (LayerNorm) rather than rms_norm_eps
    type_vocab_size: int = 0
    hidden_act: str = "silu"

    @property
    def pooling_only(self) -> bool:
        """The engine only pools (an encoder, or `runner="pooling"`): it has no decode steps,
        so its default step token budget is vLLM's pooling one."""
        return self.supported_tasks == ["embed"]

    @classmethod
    def from_path(
        cls,
        path: str,
        tokenizer: str | None = None,
        max_model_len: int | None = None,
        runner: str = "auto",
    ) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"model path {path!r} is not a checkpoint directory (no config.json there)"
            )
        raw = json.loads(config_file.read_text())
        raw = {**raw.get("text_config", {}), **raw}
        architecture = (raw.get("architectures") or [_arch_from_type(raw.get("model_type", ""))])[0]
        heads = raw["num_attention_heads"]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
        if (
            rope_scaling is not None
            and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default"
        ):
            rope_scaling = None
        eos = _eos_ids(Path(path), raw)
        max_pos = raw.get("max_position_embeddings", 2048)
        if max_model_len is not None and max_model_len > max_pos:
            raise ValueError(
                f"max_model_len={max_model_len} is larger than the model's "
                f"max_position_embeddings={max_pos}"
            )
        is_causal = architecture not in ENCODER_ARCHITECTURES
        tasks = _supported_tasks(architecture, runner)
        pooler_config, st_max = None, None
        if "embed" in tasks:
            try:
                pooler_config = read_pooler_config(Path(path), raw, is_causal)
                st_max = sentence_transformers_max_len(Path(path))
            except ValueError:
                if runner != "auto" or "generate" not in tasks:
                    raise
                # A generative checkpoint whose pooling zllm cannot run: it only generates.
                tasks, pooler_config = ["generate"], None
        default_len = max_pos
        if st_max is not None:
            if max_model_len is not None and max_model_len > st_max:
                raise ValueError(
                    f"max_model_len={max_model_len} is larger than the checkpoint's "
                    f"sentence-transformers max_seq_length={st_max}"
                )
            default_len = min(max_pos, st_max)
        return cls(
            path=str(path),
            tokenizer=str(tokenizer or path),
            architecture=architecture,
            model_type=raw.get("model_type", ""),
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", raw.get("model_type") == "qwen2")),
            qk_norm=raw.get("model_type") == "qwen3",
            eos_token_ids=eos,
            max_model_len=max_model_len or default_len,
            supported_tasks=tasks,
            is_causal=is_causal,
            pooler_config=pooler_config,
            layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
            type_vocab_size=raw.get("type_vocab_size", 0),
            hidden_act=raw.get("hidden_act", "silu"),
        )


def _supported_tasks(architecture: str, runner: str) -> list[str]:
    """What an engine of this checkpoint serves: "generate" needs an LM head (`*ForCausalLM`);
    every architecture pools its hidden states ("embed")."""
    can_generate = architecture.endswith("ForCausalLM")
    if runner == "generate":
        if not can_generate:
            raise ValueError(
                f"runner='generate' needs a model with an LM head; {architecture} has none "
                "(use runner='pooling')"
            )
        return ["generate"]
    if runner == "pooling":
        return ["embed"]
    return ["generate", "embed"] if can_generate else ["embed"]


def _arch_from_type(model_type: str) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }.get(model_type, model_type)


def _eos_ids(path: Path, raw: dict) -> list[int]:
    """EOS ids from config.json and generation_config.json (either may hold a list)."""
    ids: list[int] = []
    sources = [raw]
    gen = path / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()))
    for source in sources:
        value = source.get("eos_token_id")
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


def cache_dir() -> Path:
    """Where zllm keeps converted models (`$ZLLM_CACHE`, default ~/.cache/zllm)."""
    return Path(os.environ.get("ZLLM_CACHE", Path.home() / ".cache" / "zllm"))
