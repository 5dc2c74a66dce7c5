"""`LLM.start_profile()` / `stop_profile()`: the torch profiler around this rank's steps.

Traces go to `$ZLLM_TORCH_PROFILER_DIR` (as vLLM's `VLLM_TORCH_PROFILER_DIR`), read in the
worker's own environment, one Chrome trace per rank and profile: open it in Perfetto or
chrome://tracing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

PROFILER_DIR_ENV = "ZLLM_TORCH_PROFILER_DIR"


class WorkerProfiler:
    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self.profile: torch.profiler.profile | None = None

    def start(self) -> None:
        directory = os.environ.get(PROFILER_DIR_ENV)
        if not directory:
            raise RuntimeError(
                f"the profiler is off: set {PROFILER_DIR_ENV} to a directory for the traces "
                "before the engine starts"
            )
        if self.profile is not None:
            raise RuntimeError("the profiler is already running (call stop_profile first)")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.directory = Path(directory)
        self.profile = torch.profiler.profile(activities=activities, record_shapes=True)
        self.profile.start()

    def stop(self) -> str:
        """Stop and write the trace; return its path."""
        if self.profile is None:
            raise RuntimeError("the profiler is not running (call start_profile first)")
        profile, self.profile = self.profile, None
        profile.stop()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"zllm-rank{self.rank}-{os.getpid()}-{time.time_ns()}.trace.json"
        profile.export_chrome_trace(str(path))
        return str(path)
