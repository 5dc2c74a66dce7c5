"""The client's output path: detokenization never blocks request submission.

The I/O thread folds each step into the request states under each request's own lock only;
`add_request` and `abort` from other threads take the registry's lock, held only for
dictionary work. A detokenizer that takes half a second per token shows it.
"""

from __future__ import annotations

import threading
import time

import pytest
from scripts.scenario_process import tiny_async_engine

from zllm import SamplingParams
from zllm.frontend.detokenizer import IncrementalDetokenizer

SLOW_S = 0.5


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    engine = tiny_async_engine(tiny_checkpoints["llama"])
    yield engine
    engine.shutdown()


@pytest.mark.timeout(120)
def test_add_and_abort_are_not_blocked_by_a_slow_detokenization(engine, monkeypatch):
    inside = threading.Event()
    original = IncrementalDetokenizer.step

    def slow_step(self, token_id: int) -> str:
        if threading.current_thread().name == "zllm-client-io":
            inside.set()
            time.sleep(SLOW_S)
        return original(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "step", slow_step)
    slow = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    _, stream = engine._add_request("A slow stream", slow, "slow")
    assert inside.wait(30), "the I/O thread never detokenized"

    # The I/O thread is now inside a half-second decode, within a step's delivery.
    latencies = {}
    start = time.monotonic()
    _, other = engine._add_request("Another request", SamplingParams(max_tokens=2), "other")
    latencies["add_request"] = time.monotonic() - start
    start = time.monotonic()
    engine.client.abort(["other"])
    latencies["abort"] = time.monotonic() - start
    assert all(t < SLOW_S / 5 for t in latencies.values()), latencies
    assert other.get_blocking(timeout=5).outputs[0].finish_reason == "abort"

    outputs = []
    while not (outputs and outputs[-1].finished):
        outputs.append(stream.get_blocking(timeout=30))
    assert len(outputs[-1].outputs[0].token_ids) == 4
    assert outputs[-1].outputs[0].finish_reason == "length"
