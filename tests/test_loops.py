"""One engine, any event loop: the scenarios that hang or fail in vLLM (seeds 000, 001, 004).

Each scenario runs in its own process (tests/scripts/loop_scenarios.py) with a hard
timeout, all started together so they overlap; a hang fails its test.
"""

from __future__ import annotations

import json

import pytest
from scripts.scenario_process import ScenarioProcess

TIMEOUT_S = 240
SCENARIOS = ["five_runs", "outside_loop", "two_threads", "uvloop_and_default", "llm_threads"]


@pytest.fixture(scope="module")
def runs(tiny_checkpoints):
    model = tiny_checkpoints["llama"]
    procs = {name: ScenarioProcess("loop_scenarios.py", name, model) for name in SCENARIOS}
    procs["seed004"] = ScenarioProcess("seed004_streaming.py", model)
    yield procs
    for proc in procs.values():
        proc.kill()


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_five_successive_asyncio_runs(runs):
    result = runs["five_runs"].result(TIMEOUT_S)
    assert result["runs"] == 5
    assert all(len(tokens) == 8 for tokens in result["tokens"])


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_engine_built_outside_a_loop_serves_inside_asyncio_run(runs):
    result = runs["outside_loop"].result(TIMEOUT_S)
    assert result["architecture"] == "LlamaForCausalLM"
    assert result["tp"] == 1 and result["max_num_seqs"] == 256 and result["max_model_len"] == 1024
    assert result["decoding_backend"] == "none"
    assert result["tokenizer_roundtrip"].strip() == "Paris"
    assert result["reset_prefix_cache"] is True  # nothing running: the cache can be dropped
    assert result["state"] == [True, False]  # is_running, errored


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_two_threads_with_their_own_loops_generate_at_once(runs):
    result = runs["two_threads"].result(TIMEOUT_S)
    assert result["overlap_s"] > 0, "the two loops' generations did not overlap"


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_uvloop_and_default_loop(runs):
    result = runs["uvloop_and_default"].result(TIMEOUT_S)
    assert result["uvloop_module"].startswith("uvloop")


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_llm_from_plain_code_threads_and_inside_a_loop(runs):
    """Also: the LLM is built in a thread that exits before it is used. Inside a running loop
    (a notebook) it works, blocking that loop, and warns once."""
    result = runs["llm_threads"].result(TIMEOUT_S)
    [warning] = result["warnings"]
    assert "blocks this thread's running event loop" in warning
    assert result["ticks"] > 0  # the other thread's loop kept running meanwhile


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_seed_004_streaming_example(runs):
    code, out, err = runs["seed004"].finish(TIMEOUT_S)
    assert code == 0, err[-5000:]
    assert out.count("Generation complete!") == 3
    assert "All streaming examples completed!" in out and "Shutting down engine..." in out
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["streamed"] == result["final"]  # the DELTA pieces add up to the final text
    assert all(len(text) > 0 for text in result["final"].values())
