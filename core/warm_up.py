"""One request through the engine before a daemon reports ready.

A prompt chunk and a decode step (a pooling prefill for an embedding model) run once, so
whatever the first step initializes lazily (kernel compilation on a GPU, allocator growth,
the worker's buffers) is done before `READY=1`, not during the first client's request. The
request's prefix blocks are dropped again.
"""

from __future__ import annotations

import time

from zllm.core.engine_core import EngineCore
from zllm.protocol.messages import AddRequest
from zllm.protocol.pooling_params import PoolingParams
from zllm.protocol.sampling_params import SamplingParams

CLIENT = b"\0warm-up"  # no client identity is 9 bytes: ours are 16


def warm_up(engine: EngineCore, timeout_s: float) -> float:
    """Run the request to its end; return how long it took."""
    start = time.monotonic()
    config = engine.model_config
    prompt = [0] * max(1, min(engine.kv.block_size, config.max_model_len - 2))
    if "generate" in config.supported_tasks:
        request = AddRequest(
            request_id="warm-up",
            prompt_token_ids=prompt,
            sampling_params=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
        )
    else:
        request = AddRequest(
            request_id="warm-up", prompt_token_ids=prompt, pooling_params=PoolingParams()
        )
    refused = engine.add_request(CLIENT, request)
    if refused is not None:
        raise RuntimeError(f"the warm-up request was refused: {refused.error}")
    while engine.has_work():
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the warm-up request did not finish in {timeout_s:.0f} s")
        engine.step()
    engine.reset_prefix_cache()
    return time.monotonic() - start
