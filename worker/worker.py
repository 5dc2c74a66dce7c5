"""One rank: owns a device, the model's shard on it, and its KV cache.

Runs inside a worker process (`worker/main.py`), or inside engine-core for the in-process
executor. Methods callable by name from the core are listed in `CALLABLE`.
"""

from __future__ import annotations

import gc
import logging
import os

import torch
import torch.distributed as dist

from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.worker_messages import ExecuteModel, ModelOutput, ScheduledChunk
from zllm.worker.loader import load_model
from zllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024**2

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Worker:
    CALLABLE = frozenset({"init_kv_cache", "sleep", "wake_up", "ping"})

    def __init__(
        self,
        engine_args: EngineArgs,
        model_config: ModelConfig,
        rank: int = 0,
        world_size: int = 1,
        dist_init_method: str | None = None,
    ) -> None:
        self.engine_args = engine_args
        self.model_config = model_config
        self.rank = rank
        self.world_size = world_size
        device = engine_args.resolved_device()
        if device == "cuda":
            device = f"cuda:{rank}"
            torch.cuda.set_device(device)
        self.device = torch.device(device)
        dtype_name = engine_args.resolved_dtype(device)
        if dtype_name not in _DTYPES:
            raise ValueError(
                f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype_name!r}"
            )
        self.dtype = _DTYPES[dtype_name]
        if world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend, init_method=dist_init_method, rank=rank, world_size=world_size
            )
        torch.manual_seed(engine_args.seed)
        self.model = load_model(model_config, self.device, self.dtype, progress=rank == 0)
        self.num_kv_heads = model_config.num_key_value_heads // world_size
        self.runner = ModelRunner(self.model, model_config, self.device, engine_args.block_size)
        self.num_kv_blocks = 0
        self.host_weights: dict[str, torch.Tensor] | None = None  # level-1 sleep keeps them here
        self.weights_dropped = False

    # ---- KV cache sizing -------------------------------------------------------------------------

    def available_kv_blocks(self) -> int:
        """How many blocks fit in the memory this rank may use for KV."""
        per_block = self.runner.kv_bytes_per_block(self.num_kv_heads)
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = self.engine_args.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES
        return max(int(budget // per_block), 0)

    def _cuda_kv_budget(self) -> int:
        if self.engine_args.kv_cache_memory_bytes:
            return self.engine_args.kv_cache_memory_bytes
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._profile_run()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        peak = torch.cuda.max_memory_allocated()
        return int(total * self.engine_args.gpu_memory_utilization - used_by_others - peak)

    def _profile_run(self) -> None:
        """A forward pass at the largest step size, to measure peak activation memory."""
        tokens = self.engine_args.resolved_max_num_batched_tokens(self.model_config.max_model_len)
        tokens = min(tokens, self.model_config.max_model_len)
        bs = self.engine_args.block_size
        blocks = -(-tokens // bs)
        self.runner.allocate_kv_cache(blocks, self.num_kv_heads)
        chunk = ScheduledChunk(
            request_id="profile",
            token_ids=[0] * tokens,
            start=0,
            block_ids=list(range(blocks)),
            sample=False,
        )
        self.runner.execute(ExecuteModel(new_requests=[], chunks=[chunk], finished_request_ids=[]))
        torch.cuda.synchronize()
        self.runner.free_kv_cache()

    # ---- callable from the core ----------------------------------------------------------------

    def init_kv_cache(self, num_blocks: int) -> int:
        self.num_kv_blocks = num_blocks
        self.runner.allocate_kv_cache(num_blocks, self.num_kv_heads)
        return num_blocks

    def execute_model(self, step: ExecuteModel) -> ModelOutput:
        return self.runner.execute(step)

    def ping(self) -> int:
        return os.getpid()

    def sleep(self, level: int = 1) -> None:
        """Level 1: weights to host memory, KV cache freed. Level 2: weights dropped too."""
        self.runner.free_kv_cache()
        if self.host_weights is None and not self.weights_dropped:
            params = dict(self.model.named_parameters())
            self.host_weights = (
                {k: v.data.to("cpu", copy=True) for k, v in params.items()} if level == 1 else None
            )
            for p in params.values():
                p.data = torch.empty(0, dtype=p.dtype, device=self.device)
            self.weights_dropped = True
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = tags or ["weights", "kv_cache"]
        if "weights" in tags and self.weights_dropped:
            if self.host_weights is not None:
                for name, p in self.model.named_parameters():
                    p.data = self.host_weights[name].to(self.device)
            else:  # level 2: read the checkpoint again
                self.model = load_model(self.model_config, self.device, self.dtype, progress=False)
                self.runner.model = self.model
            self.host_weights = None
            self.weights_dropped = False
        if "kv_cache" in tags and not self.runner.kv_caches:
            self.runner.allocate_kv_cache(self.num_kv_blocks, self.num_kv_heads)

    def call(self, method: str, args: list) -> object:
        if method not in self.CALLABLE:
            raise ValueError(f"worker has no callable method {method!r}")
        return getattr(self, method)(*args)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
