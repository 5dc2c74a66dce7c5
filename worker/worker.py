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
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams
from zllm.protocol.worker_messages import (
    ExecuteModel,
    ModelOutput,
    NewBlocks,
    NewRequest,
    SlotStart,
)
from zllm.worker.layers.backend import attention_backend_name, make_attention_backend
from zllm.worker.layers.encoder_attention import EncoderAttentionBackend
from zllm.worker.loader import load_model
from zllm.worker.model_runner import ModelRunner, PendingStep
from zllm.worker.profiler import WorkerProfiler

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 512 * 1024**2

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def gpu_index(engine_args: EngineArgs, rank: int, num_gpus: int) -> int:
    """The GPU of `rank` in replica `data_parallel_rank`: replicas take consecutive groups of
    `tensor_parallel_size` GPUs."""
    index = engine_args.data_parallel_rank * engine_args.tensor_parallel_size + rank
    if index >= num_gpus:
        raise ValueError(
            f"data_parallel_rank={engine_args.data_parallel_rank} with tensor_parallel_size="
            f"{engine_args.tensor_parallel_size}: rank {rank} needs GPU {index}, but this host "
            f"has {num_gpus}; serve fewer replicas"
        )
    return index


class Worker:
    CALLABLE = frozenset(
        {
            "init_kv_cache",
            "sleep",
            "wake_up",
            "ping",
            "device_info",
            "start_profile",
            "stop_profile",
        }
    )

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
            device = f"cuda:{gpu_index(engine_args, rank, torch.cuda.device_count())}"
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
        # CPU ranks share the cores: split the threads rather than oversubscribe them.
        if self.device.type == "cpu" and world_size > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
        self.kernels = attention_backend_name(self.device)
        self.model = self._load_model(progress=rank == 0)
        self.num_kv_heads = model_config.num_key_value_heads // world_size
        attn_backend = (
            EncoderAttentionBackend(self.device) if not self.model.uses_kv_cache else None
        )
        attn_backend = attn_backend or make_attention_backend(
            self.kernels,
            self.device,
            engine_args.block_size,
            model_config.num_attention_heads // world_size,
            self.num_kv_heads,
            model_config.head_dim,
            engine_args.max_num_seqs,
            engine_args.resolved_max_num_batched_tokens(
                model_config.max_model_len, model_config.pooling_only
            ),
            model_config.max_model_len,
        )
        self.runner = ModelRunner(
            self.model,
            model_config,
            self.device,
            engine_args.block_size,
            attn_backend,
            engine_args.max_num_seqs,
        )
        self.graph_sizes = self._cuda_graph_sizes()
        if self.graph_sizes:
            self.runner.use_cuda_graphs(self.graph_sizes)
        self.graph_reserve = 0  # device bytes the graphs' memory pool takes (measured)
        self.num_kv_blocks = 0
        self.weights_where = "device"  # "device" | "host" (level-1 sleep) | "dropped" (level 2)
        self.host_weights: dict[str, torch.Tensor] | None = None
        self.kv_asleep = False
        self.profiler = WorkerProfiler(rank, self.device)

    def _cuda_graph_sizes(self) -> list[int]:
        """The decode batch sizes to capture (none: every step runs eagerly), and why not."""
        args = self.engine_args
        why_not = None
        if args.enforce_eager:
            why_not = "enforce_eager=True"
        elif self.device.type != "cuda":
            why_not = f"not on CUDA ({self.device.type})"
        elif self.kernels != "triton":
            why_not = f"the {self.kernels} attention backend"
        elif not self.model.uses_kv_cache:
            why_not = "an encoder (no decode steps)"
        if why_not is not None:
            if self.device.type == "cuda" and self.rank == 0:
                logger.info("CUDA graphs off: %s", why_not)
            return []
        from zllm.worker.cuda_graphs import capture_sizes

        asked = (args.compilation_config or {}).get("cudagraph_capture_sizes")
        return capture_sizes(args.max_num_seqs, asked)

    def _load_model(self, progress: bool) -> torch.nn.Module:
        return load_model(
            self.model_config,
            self.device,
            self.dtype,
            progress=progress,
            load_format=self.engine_args.load_format,
            kernels=self.kernels,
            seed=self.engine_args.seed,
        )

    # ---- KV cache sizing -------------------------------------------------------------------------

    def available_kv_blocks(self) -> int:
        """How many blocks fit in the memory this rank may use for KV.

        A model without a KV cache (an encoder) holds blocks only while its step runs: as many
        as the largest step can use, and no memory behind them.
        """
        if not self.model.uses_kv_cache:
            if self.engine_args.kv_cache_memory_bytes is not None:
                raise ValueError(
                    f"kv_cache_memory_bytes: {self.model_config.architecture} keeps no KV cache"
                )
            tokens = self.engine_args.resolved_max_num_batched_tokens(
                self.model_config.max_model_len, self.model_config.pooling_only
            )
            return -(-tokens // self.engine_args.block_size) + self.engine_args.max_num_seqs
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
        budget = total * self.engine_args.gpu_memory_utilization - used_by_others - peak
        return int(budget - self.graph_reserve)

    def _profile_run(self) -> None:
        """A forward pass at the largest step size, to measure peak activation memory."""
        tokens = self.engine_args.resolved_max_num_batched_tokens(
            self.model_config.max_model_len, self.model_config.pooling_only
        )
        tokens = min(tokens, self.model_config.max_model_len)
        bs = self.engine_args.block_size
        blocks = -(-tokens // bs)
        self.runner.allocate_kv_cache(blocks, self.num_kv_heads)
        # Slot 0, freed at once: the engine has not handed out any slot yet.
        prompt = NewRequest(slot=0, prompt_token_ids=[0] * tokens, sampling_params=SamplingParams())
        if not self.model.can_generate:
            prompt.sampling_params, prompt.pooling_params = None, PoolingParams()
        self.runner.execute(
            ExecuteModel(
                new_requests=[prompt],
                started=[SlotStart(0, 0)],
                new_block_ids=[NewBlocks(0, list(range(blocks)))],
                slots=[0],
                num_scheduled_tokens=[tokens],
            )
        )
        self.runner.execute(ExecuteModel(finished_slots=[0]))
        torch.cuda.synchronize()
        if self.graph_sizes:  # the largest graph's memory pool, which all the graphs share
            before = torch.cuda.memory_reserved()
            self.runner.capture_graphs([max(self.graph_sizes)])
            self.graph_reserve = int(1.25 * (torch.cuda.memory_reserved() - before)) + 2**26
        self.runner.free_kv_cache()

    # ---- callable from the core ----------------------------------------------------------------

    def init_kv_cache(self, num_blocks: int) -> int:
        self.num_kv_blocks = num_blocks
        self.runner.allocate_kv_cache(num_blocks, self.num_kv_heads)
        self._capture_graphs()
        return num_blocks

    def _capture_graphs(self) -> None:
        if not self.graph_sizes or not self.runner.kv_caches:
            return
        seconds = self.runner.capture_graphs()
        if self.rank == 0:
            logger.info(
                "captured %d CUDA graphs (decode batches %d..%d) in %.2f s",
                len(self.graph_sizes),
                self.graph_sizes[0],
                self.graph_sizes[-1],
                seconds,
            )

    def execute_model(self, step: ExecuteModel) -> ModelOutput:
        return self.runner.execute(step)

    def launch_step(self, step: ExecuteModel) -> PendingStep:
        """Queue a step's device work; `finish_step` waits for it (the worker process runs
        the next step's host work in between)."""
        return self.runner.launch(step)

    def finish_step(self, pending: PendingStep) -> ModelOutput:
        return self.runner.finish(pending)

    def must_finish_first(self, step: ExecuteModel, pending: PendingStep) -> bool:
        return self.runner.must_finish_first(step, pending)

    def ping(self) -> int:
        return os.getpid()

    def device_info(self) -> dict:
        """Where this rank runs (for `collective_rpc("device_info")`)."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "pid": os.getpid(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "num_kv_blocks": self.num_kv_blocks,
        }

    def start_profile(self) -> None:
        self.profiler.start()

    def stop_profile(self) -> str:
        return self.profiler.stop()

    # ---- sleep mode ------------------------------------------------------------------------------

    def sleep(self, level: int = 1) -> list[str]:
        """Free this rank's device memory; return what is asleep.

        Level 1: weights (and buffers) copied to host memory, KV cache freed. Level 2: weights
        dropped too, re-read from the checkpoint on wake-up. Every device tensor loses its last
        reference before `empty_cache`, so the allocator really hands the memory back.
        """
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        self.runner.free_kv_cache()
        self.kv_asleep = True
        if self.weights_where == "device" or (level == 2 and self.weights_where == "host"):
            keep = level == 1 and self.weights_where == "device"
            self.host_weights = {} if keep else None
            for name, module, attr, tensor in self._device_tensors():
                if keep:
                    self.host_weights[name] = _to_host(tensor)
                _replace(module, attr, torch.empty(0, dtype=tensor.dtype, device=self.device))
            self.weights_where = "host" if keep else "dropped"
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.asleep()

    def wake_up(self, tags: list[str] | None = None) -> list[str]:
        """Bring back `tags` ("weights", "kv_cache"; None: both); return what is still asleep."""
        tags = ["weights", "kv_cache"] if tags is None else tags
        if "weights" in tags and self.weights_where == "host":
            assert self.host_weights is not None
            modules = dict(self.model.named_modules())
            for name, tensor in self.host_weights.items():
                module_name, _, attr = name.rpartition(".")
                _replace(modules[module_name], attr, tensor.to(self.device))
            self.host_weights = None
            self.weights_where = "device"
        elif "weights" in tags and self.weights_where == "dropped":
            self.model = self._load_model(progress=False)
            self.runner.model = self.model
            self.weights_where = "device"
        if "kv_cache" in tags and self.kv_asleep:
            self.runner.allocate_kv_cache(self.num_kv_blocks, self.num_kv_heads)
            self.kv_asleep = False
        graphs = self.runner.graphs
        if graphs is not None and not graphs.captured and not self.asleep():
            self._capture_graphs()  # they point at the weights and the cache: both are back
        return self.asleep()

    def asleep(self) -> list[str]:
        asleep = ["weights"] if self.weights_where != "device" else []
        return asleep + ["kv_cache"] if self.kv_asleep else asleep

    def _device_tensors(self) -> list[tuple[str, torch.nn.Module, str, torch.Tensor]]:
        """(qualified name, owning module, attribute, tensor) for every parameter and buffer."""
        found = []
        seen: set[int] = set()  # tied weights: one tensor, offloaded once
        for module_name, module in self.model.named_modules():
            for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None:
                    continue
                name = f"{module_name}.{attr}" if module_name else attr
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                found.append((name, module, attr, tensor))
        return found

    def call(self, method: str, args: list, kwargs: dict | None = None) -> object:
        if method not in self.CALLABLE:
            raise ValueError(f"worker has no callable method {method!r}")
        return getattr(self, method)(*args, **(kwargs or {}))

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy; pinned when it comes from CUDA, so waking up copies at full speed."""
    if tensor.device.type == "cpu":
        return tensor.detach()  # already there: keep the storage, not the (emptied) Parameter
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    host.copy_(tensor.detach())
    return host


def _replace(module: torch.nn.Module, attr: str, tensor: torch.Tensor) -> None:
    """Point a module's parameter or buffer at `tensor`, dropping the old storage."""
    if attr in module._parameters:
        module._parameters[attr].data = tensor
    else:
        module._buffers[attr] = tensor
