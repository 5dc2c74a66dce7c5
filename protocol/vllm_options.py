"""vLLM's engine options that zllm accepts: which values work, and a clear error for the rest.

A vLLM script passes these as `LLM(...)`/`EngineArgs(...)` keywords. zllm never ignores one:
a value it honours passes, any other raises here, at construction, naming the option and
what is supported (`NotImplementedError` for a feature zllm lacks, `ValueError` for a value
that is wrong anywhere). docs/vllm-compat.md lists each, and a test checks the list.
"""

from __future__ import annotations

import random
from typing import Any

DTYPE_ALIASES = {"half": "float16", "float": "float32"}
DTYPES = ("auto", "float32", "float16", "bfloat16")
LORA_DEFAULTS = {"enable_lora": False, "max_loras": 1, "max_lora_rank": 16, "max_cpu_loras": None}


def unsupported(option: str, value: Any, why: str) -> NotImplementedError:
    return NotImplementedError(f"{option}={value!r} is not supported by zllm: {why}")


def check_vllm_options(args: Any) -> None:
    """Normalise vLLM's spellings (`dtype=torch.float16`, "half") and refuse what zllm cannot
    honour. `args` is an `EngineArgs` (typed loosely: this module is imported by its own)."""
    _check_dtype(args)
    if args.seed is None:  # vLLM's "not reproducible": a seed of its own
        args.seed = random.SystemRandom().randrange(2**31)
    if not isinstance(args.seed, int) or isinstance(args.seed, bool):
        raise ValueError(f"seed must be an integer or None, got {args.seed!r}")
    if args.tokenizer_mode not in ("auto", "hf"):
        if args.tokenizer_mode in ("slow", "mistral", "custom"):
            raise unsupported(
                "tokenizer_mode",
                args.tokenizer_mode,
                "the tokenizer is transformers' AutoTokenizer (use 'auto' or 'hf')",
            )
        raise ValueError(f"tokenizer_mode must be 'auto' or 'hf', got {args.tokenizer_mode!r}")
    if not isinstance(args.generation_config, str) or not args.generation_config:
        raise ValueError(
            "generation_config must be 'auto', 'vllm' or a folder holding generation_config.json, "
            f"got {args.generation_config!r}"
        )
    if args.override_generation_config is not None and not isinstance(
        args.override_generation_config, dict
    ):
        raise ValueError(
            f"override_generation_config must be a dict, got {args.override_generation_config!r}"
        )
    if not _is_number(args.swap_space) or args.swap_space < 0:
        raise ValueError(f"swap_space must be a number of GiB >= 0, got {args.swap_space!r}")
    if args.quantization is not None:
        raise unsupported(
            "quantization", args.quantization, "it runs unquantized checkpoints only (None)"
        )
    if args.kv_cache_dtype != "auto":
        raise unsupported(
            "kv_cache_dtype",
            args.kv_cache_dtype,
            "not yet; the KV cache has the model's dtype ('auto')",
        )
    if not isinstance(args.enforce_eager, bool):
        raise ValueError(f"enforce_eager must be True or False, got {args.enforce_eager!r}")
    if not _no_compile(args.compilation_config):
        raise unsupported(
            "compilation_config",
            args.compilation_config,
            "no torch.compile: use None, 0, or a dict of level/mode 0 and cudagraph_capture_sizes",
        )
    for option, feature in (
        ("pipeline_parallel_size", "use tensor_parallel_size to split a model"),
        ("data_parallel_size", "run one engine per replica"),
    ):
        value = getattr(args, option)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
        if value > 1:
            raise unsupported(option, value, f"only 1 is supported; {feature}")
    if not _is_number(args.cpu_offload_gb) or args.cpu_offload_gb < 0:
        raise ValueError(f"cpu_offload_gb must be a number >= 0, got {args.cpu_offload_gb!r}")
    if args.cpu_offload_gb > 0:
        raise unsupported(
            "cpu_offload_gb", args.cpu_offload_gb, "the weights live on the device (0 only)"
        )
    for option, default in LORA_DEFAULTS.items():
        value = getattr(args, option)
        if value != default:
            raise unsupported(option, value, "LoRA adapters are not supported")
    if args.speculative_config is not None:
        raise unsupported(
            "speculative_config", args.speculative_config, "speculative decoding is not supported"
        )


def _check_dtype(args: Any) -> None:
    dtype = args.dtype
    if not isinstance(dtype, str) and str(dtype).startswith("torch."):
        dtype = str(dtype).removeprefix("torch.")  # a torch.dtype, as vLLM accepts
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (or 'half', 'float'), got {args.dtype!r}")
    args.dtype = dtype


def _no_compile(compilation_config: Any) -> bool:
    """True for the settings that ask for no torch.compile: None, level/mode 0, a dict of
    those and `cudagraph_capture_sizes` (the decode batch sizes captured in CUDA graphs,
    checked by the worker against max_num_seqs)."""
    if compilation_config is None or compilation_config == 0:
        return True
    if isinstance(compilation_config, dict):
        return all(
            (k in ("level", "mode") and v == 0)
            or (k == "cudagraph_capture_sizes" and isinstance(v, list))
            for k, v in compilation_config.items()
        )
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
