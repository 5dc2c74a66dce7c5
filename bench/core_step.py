"""Engine-core's own host time per decode step, with workers that answer at once.

    python bench/core_step.py --num-requests 256 --steps 300

With overlap, the workers run step N while engine-core applies step N-1 and schedules N+1;
when that host work takes longer than the GPU's step, the GPU waits for engine-core. This
measures that host work alone: an `EngineCore` over an executor that encodes each step as the
real one does and answers it at once (every scheduled request samples token 5), the updates
encoded as the server sends them. Prompts all fit the first step, so every later step is a
decode of every request. Prints one JSON line: milliseconds per step and per request.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import deque
from pathlib import Path

from zllm.bench.shapes import write_shape
from zllm.core.engine_core import EngineCore
from zllm.core.executor import Executor
from zllm.protocol.config import EngineArgs, ModelConfig
from zllm.protocol.messages import AddRequest, StepOutputs, encode
from zllm.protocol.process import freeze_startup_heap
from zllm.protocol.sampling_params import SamplingParams
from zllm.protocol.worker_messages import ExecuteModel, ModelOutput
from zllm.protocol.worker_messages import encode as encode_for_workers


class InstantExecutor(Executor):
    """Encodes each step (as the broadcast does) and answers it at once."""

    def __init__(self, num_kv_blocks: int) -> None:
        self.num_kv_blocks = num_kv_blocks
        self._outputs: deque[ModelOutput] = deque()

    def submit(self, step: ExecuteModel) -> None:
        encode_for_workers(step)
        tokens = [5] * len(step.slots)  # every request ends its known tokens (see the doc)
        self._outputs.append(ModelOutput(sampled_token_ids=tokens))

    def get_output(self) -> ModelOutput:
        return self._outputs.popleft()

    def collective_rpc(self, method, *args, kwargs=None, timeout_s=None) -> list:
        return []

    def check_health(self) -> None:
        pass

    def ping(self, timeout_s: float) -> None:
        pass

    def shutdown(self) -> None:
        pass


def run(num_requests: int, prompt_len: int, steps: int, shape: str) -> dict:
    model = write_shape(shape, Path(tempfile.mkdtemp()) / shape)
    max_len = prompt_len + steps + 16
    args = EngineArgs(
        model=str(model),
        max_num_seqs=num_requests,
        max_model_len=max_len,
        max_num_batched_tokens=max(num_requests * prompt_len, max_len),
        skip_tokenizer_init=True,
    )
    config = ModelConfig.from_path(str(model), max_model_len=max_len)
    blocks = num_requests * (-(-max_len // args.block_size))
    core = EngineCore(args, config, InstantExecutor(blocks))
    freeze_startup_heap()  # as engine-core's process does once it has started
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(num_requests):
        prompt = [(7 * i + j) % 1000 + 3 for j in range(prompt_len)]
        core.add_request(
            b"client",
            AddRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling_params=params),
        )
    for _ in range(3):  # the prompts, then the steady decode
        core.step()
    start = time.perf_counter()
    for _ in range(steps):
        updates = core.step()
        encode(StepOutputs(updates=[u for _, u in updates], stats=None, timestamp=0.0))
    ms = 1000 * (time.perf_counter() - start) / steps
    return {
        "bench": "core_step",
        "num_requests": num_requests,
        "steps": steps,
        "ms_per_step": round(ms, 3),
        "us_per_request": round(1000 * ms / num_requests, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    ns = parser.parse_args()
    print(json.dumps(run(ns.num_requests, ns.prompt_len, ns.steps, ns.shape)))


if __name__ == "__main__":
    main()
