"""Engine death with real processes: a SIGKILLed worker, engine-core or frontend, and
start-up failures, must reach every caller fast and with the root cause, and leave no
process behind. The kill scenarios run in their own processes
(tests/scripts/fault_scenarios.py), started together."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from scripts.scenario_process import ScenarioProcess

from zllm import LLM, AsyncLLM, EngineArgs, EngineDeadError, SamplingParams
from zllm.frontend.errors import EngineStartupError

TIMEOUT_S = 240
LONG = SamplingParams(max_tokens=900, ignore_eos=True, temperature=0)


@pytest.fixture(scope="module")
def runs(tiny_token_id_checkpoints, tmp_path_factory):
    """The scenarios, each with its own TMPDIR: where its engine's socket files live."""
    model = tiny_token_id_checkpoints["llama"]
    procs = {
        name: ScenarioProcess(
            "fault_scenarios.py", name, model, env={"TMPDIR": str(tmp_path_factory.mktemp(name))}
        )
        for name in ("kill_worker", "kill_rank", "kill_core", "frontend")
    }
    yield procs
    for proc in procs.values():
        proc.kill()


def _check_streams_died(result: dict, cause: str) -> None:
    streams = result["streams"]
    assert len(streams) == 8
    for stream in streams:
        assert stream["outcome"] == "dead", stream
        assert stream["latency_s"] < 2.0, stream
        assert cause in stream["error"], stream
    after = result["after"]
    assert after["errored"] is True and after["is_running"] is False
    assert after["dead_error"].startswith("EngineDeadError") and cause in after["dead_error"]
    for call in ("check_health", "get_stats", "generate"):  # later calls fail at once, too
        assert after[call].startswith("EngineDeadError in 0.0"), (call, after[call])


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_sigkill_worker_fails_every_stream_with_the_cause(runs):
    result = runs["kill_worker"].result(TIMEOUT_S)
    _check_streams_died(result, "worker rank 0")
    assert "SIGKILL" in result["streams"][0]["error"]
    assert result["core_gone_s"] is not None  # engine-core exits after losing a worker


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_sigkill_one_tensor_parallel_rank_fails_every_stream(runs):
    """Rank 0 is left waiting in a collective for rank 1: the core still notices at once,
    and no process of the engine is left."""
    result = runs["kill_rank"].result(TIMEOUT_S)
    _check_streams_died(result, "worker rank 1")
    assert result["all_gone_s"] is not None and result["all_gone_s"] < 2.0, result["all_gone_s"]


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_sigkill_engine_core_fails_every_stream_and_its_workers_exit(runs):
    result = runs["kill_core"].result(TIMEOUT_S)
    _check_streams_died(result, "engine-core")
    assert "SIGKILL" in result["streams"][0]["error"]
    assert result["workers_gone_s"] is not None and result["workers_gone_s"] < 5
    # The SIGKILLed core could not remove its socket files: its worker and client did.
    tmpdir = runs["kill_core"].env["TMPDIR"]
    assert not list(Path(tmpdir).glob("zllm-*")), list(Path(tmpdir).glob("zllm-*/*"))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_sigkill_frontend_leaves_no_engine_process(runs):
    frontend = runs["frontend"]
    pids = frontend.read_json_line(TIMEOUT_S)
    engine = [pids["core"], *pids["workers"]]
    assert len(engine) == 2 and not any(_gone(p) for p in engine)
    os.kill(pids["frontend"], signal.SIGKILL)
    killed = time.monotonic()
    while time.monotonic() - killed < 5 and not all(_gone(p) for p in engine):
        time.sleep(0.05)
    alive = [p for p in engine if not _gone(p)]
    assert not alive, f"still alive 5 s after the frontend was killed: {alive}"


@pytest.mark.timeout(30)
def test_bad_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        LLM(str(missing))
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        LLM(str(empty), distributed_executor_backend="uni")


@pytest.mark.timeout(120)
def test_unknown_architecture_reports_the_workers_own_message(tiny_checkpoints, tmp_path):
    model = Path(shutil.copytree(tiny_checkpoints["llama"], tmp_path / "made-up"))
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineStartupError) as info:
        LLM(str(model), kv_cache_memory_bytes=2**24)  # "mp": the error crosses two processes
    message = str(info.value)
    assert "unknown architecture 'MadeUpForCausalLM'" in message
    assert "worker rank 0 failed: ValueError" in message


@pytest.mark.timeout(120)
def test_daemon_engine_core_killed_fails_connected_streams(tiny_checkpoints, tmp_path):
    """A client of a `zllm engine-core` daemon has no child to watch: it notices the lost
    connection (ZMTP heartbeats also catch a frozen daemon)."""
    address = f"ipc://{tmp_path}/core"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "zllm.frontend.cli", "engine-core", "--address", address]
        + ["--model", tiny_checkpoints["llama"], "--distributed-executor-backend", "uni"]
        + ["--kv-cache-memory-bytes", str(2**24)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        engine = AsyncLLM(EngineArgs(engine_core_address=address))

        async def main() -> tuple[float, str]:
            started = asyncio.Event()

            async def consume() -> tuple[float, str]:
                try:
                    async for _ in engine.generate("Hello daemon", LONG):
                        started.set()
                except EngineDeadError as e:
                    return time.monotonic(), str(e)
                raise AssertionError("the stream ended without an error")

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 60)
            killed = time.monotonic()
            daemon.kill()
            died, error = await asyncio.wait_for(task, 10)
            return died - killed, error

        latency, error = asyncio.run(main())
        assert latency < 2.0 and "lost the connection to engine-core" in error
        engine.shutdown()
    finally:
        daemon.kill()
        daemon.wait()
