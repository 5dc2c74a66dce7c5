"""Start-up fails fast and says why: a daemon that cannot listen, a second daemon on a live
socket, a client pointed at nothing, an unusable model cache; no socket file is left behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from scripts.scenario_process import ScenarioProcess

from zllm import AsyncLLM, EngineArgs, SamplingParams
from zllm.frontend import core_connection
from zllm.frontend.errors import EngineStartupError


def _daemon(model: str, address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zllm.frontend.cli", "engine-core", "--address", address]
        + ["--model", model, "--distributed-executor-backend", "uni"]
        + ["--kv-cache-memory-bytes", str(2**24)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stderr=subprocess.PIPE,
        text=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_a_daemon_that_cannot_listen_exits_at_once(tiny_checkpoints, tmp_path) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    cases = {
        f"tcp://127.0.0.1:{taken}": "Address already in use",
        f"ipc://{tmp_path}/no/such/dir/core": "No such file or directory",
        "tcp://127.0.0.1:65535": "PORT must be in [1, 65534]",
        "udp://127.0.0.1:5000": "an engine-core address is ipc:///path/name or tcp://host:port",
    }
    try:
        for address, words in cases.items():
            start = time.monotonic()
            daemon = _daemon(tiny_checkpoints["llama"], address)
            _, stderr = daemon.communicate(timeout=30)
            took = time.monotonic() - start
            assert daemon.returncode != 0, (address, stderr)
            assert took < 5, (address, took)
            assert words in stderr, (address, stderr)
            assert "zllm: error:" in stderr and address.split("://")[1].split("/")[0] in stderr
    finally:
        held.close()


@pytest.mark.timeout(120)
def test_a_second_daemon_on_a_live_socket_refuses_to_start(tiny_checkpoints, tmp_path) -> None:
    address = f"ipc://{tmp_path}/core"
    first = _daemon(tiny_checkpoints["llama"], address)
    try:
        client = AsyncLLM(EngineArgs(engine_core_address=address))
        second = _daemon(tiny_checkpoints["llama"], address)
        _, stderr = second.communicate(timeout=30)
        assert second.returncode != 0 and "another engine-core is serving it" in stderr, stderr
        assert Path(f"{tmp_path}/core.in").exists() and Path(f"{tmp_path}/core.out").exists()

        async def generate() -> int:
            async for out in client.generate("Still mine", SamplingParams(max_tokens=4)):
                if out.finished:
                    return len(out.outputs[0].token_ids)

        import asyncio

        assert asyncio.run(generate()) >= 1, "the first daemon still serves its client"
        client.shutdown()
    finally:
        first.terminate()
        first.communicate(timeout=30)
    assert not Path(f"{tmp_path}/core.in").exists(), "the daemon removes its own socket files"


@pytest.mark.timeout(60)
def test_a_client_pointed_at_no_daemon_fails_fast(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(core_connection, "CONNECT_GRACE_S", 1.0)
    stale = tmp_path / "stale.out"
    with socket.socket(socket.AF_UNIX) as s:  # bound, never listening: refuses connections
        s.bind(str(stale))
        for address, words in [
            (f"ipc://{tmp_path}/none", "the socket file .*none.out does not exist"),
            (f"ipc://{tmp_path}/stale", "is stale"),
            (f"tcp://127.0.0.1:{_free_port()}", "refused the connection"),
        ]:
            start = time.monotonic()
            with pytest.raises(
                EngineStartupError, match=f"no engine-core is listening at .*{words}"
            ):
                AsyncLLM(EngineArgs(engine_core_address=address))
            assert time.monotonic() - start < 1.0 + 2.0


@pytest.mark.timeout(60)
def test_a_silent_daemon_times_out_naming_the_setting(tmp_path, monkeypatch) -> None:
    ctx = zmq.Context()
    silent = [ctx.socket(zmq.ROUTER) for _ in range(2)]
    for sock, suffix in zip(silent, ("in", "out")):
        sock.bind(f"ipc://{tmp_path}/silent.{suffix}")
    monkeypatch.setattr(core_connection, "STARTUP_TIMEOUT_S", 1.5)
    try:
        with pytest.raises(EngineStartupError, match="no Ready within 2 s .*ZLLM_STARTUP_TIMEOUT"):
            AsyncLLM(EngineArgs(engine_core_address=f"ipc://{tmp_path}/silent"))
    finally:
        for sock in silent:
            sock.close(0)
        ctx.term()


@pytest.mark.timeout(120)
def test_a_killed_frontend_leaves_no_socket_files(tiny_checkpoints, tmp_path) -> None:
    """Engine-core removes every socket file it bound (its clients' and its workers') when
    its frontend is SIGKILLed."""
    run = ScenarioProcess(
        "fault_scenarios.py", "frontend", tiny_checkpoints["llama"], env={"TMPDIR": str(tmp_path)}
    )
    try:
        run.read_json_line(90)
        assert len(list(tmp_path.glob("zllm-*/*.sock"))) == 4  # core input, output; workers, steps
        run.kill()
        deadline = time.monotonic() + 5
        while list(tmp_path.glob("zllm-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list(tmp_path.glob("zllm-*")), list(tmp_path.glob("zllm-*/*"))
    finally:
        run.kill()


@pytest.mark.timeout(30)
def test_an_unusable_model_cache_names_zllm_cache(tmp_path, monkeypatch) -> None:
    from zllm.frontend.default_model import download_default

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ZLLM_CACHE", str(blocker / "cache"))
    with pytest.raises(
        RuntimeError,
        match=r"cannot write smollm2-135m-instruct to the model cache .*Set ZLLM_CACHE",
    ):
        download_default(quiet=True)
    if os.geteuid() != 0:
        return
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)]
    ).returncode:
        return  # no mounting here: the case above stands
    try:
        monkeypatch.setenv("ZLLM_CACHE", str(readonly))
        with pytest.raises(RuntimeError, match="Read-only file system.*ZLLM_CACHE"):
            download_default(quiet=True)
    finally:
        subprocess.run(["umount", str(readonly)])
