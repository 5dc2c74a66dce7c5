"""vLLM's `cleanup_dist_env_and_memory()`, called after `del llm` to free the device before the
next engine starts.

zllm's own process holds no distributed state; the device memory belongs to the engine's
processes. A dropped `LLM` asks its client to stop them; this waits until they are gone, so
the next engine starts with the memory back, then empties this process's CUDA cache.
"""

from __future__ import annotations

import gc
import sys

from zllm.frontend.engine_client import wait_for_dropped_clients


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    """`shutdown_ray`: accepted for vLLM's signature; zllm never starts Ray."""
    gc.collect()  # runs the finalizers of dropped engines (those in reference cycles too)
    wait_for_dropped_clients()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
