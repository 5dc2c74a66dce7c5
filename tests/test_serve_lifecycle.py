"""`zllm serve` stopping and dying: SIGTERM while 8 streams run (the short ones finish, the
long ones end with an abort error after `--shutdown-timeout`, exit code 0), and a SIGKILLed
engine-core (`/health` turns 503 within 2 s; requests get 503). Two tiny-model servers, started
together."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import pytest
from scripts.serve_process import ServerProcess

pytestmark = pytest.mark.timeout(180)
SHUTDOWN_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def servers(tiny_checkpoints):
    common = ["--distributed-executor-backend", "uni", "--kv-cache-memory-bytes", str(2**24)]
    procs = {
        "sigterm": ServerProcess(
            tiny_checkpoints["llama"], *common, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)
        ),
        "kill_core": ServerProcess(tiny_checkpoints["llama"], *common),
    }
    try:
        yield {name: proc.wait_ready() for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()


async def _stream(session: aiohttp.ClientSession, url: str, max_tokens: int, started) -> dict:
    body = {"prompt": "Tell a story:", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    events = []
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                started.release()
    return {"events": events, "max_tokens": max_tokens}


def test_sigterm_lets_streams_finish_or_aborts_them_and_exits_0(servers):
    server = servers["sigterm"]

    async def run():
        started = asyncio.Semaphore(0)
        async with aiohttp.ClientSession() as session:
            # 4 streams that finish within the grace period, 4 that cannot
            tasks = [
                asyncio.ensure_future(_stream(session, server.url, n, started))
                for n in [10] * 4 + [900] * 4
            ]
            for _ in range(8):  # every stream is running
                await started.acquire()
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = await asyncio.gather(*tasks)
            return results, time.monotonic() - signalled

    results, seconds = asyncio.run(run())
    code = server.proc.wait(30)
    assert code == 0, server.output()
    assert seconds < SHUTDOWN_TIMEOUT_S + 10
    for result in results:
        events = result["events"]
        assert events[-1] == b"[DONE]", events[-3:]
        last = json.loads(events[-2])
        if result["max_tokens"] == 10:
            assert last["choices"][0]["finish_reason"] == "length"
        else:
            assert last["error"]["code"] == "shutting_down"
            assert "--shutdown-timeout" in last["error"]["message"]


def test_health_turns_503_within_2s_of_engine_core_sigkill(servers):
    server = servers["kill_core"]
    assert server.health() == 200
    os.kill(server.engine_core_pid(), signal.SIGKILL)
    killed = time.monotonic()
    while server.health() != 503:
        assert time.monotonic() - killed < 2.0, "no 503 from /health within 2 s"
        time.sleep(0.05)

    async def ask() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "Hi", "max_tokens": 2}
            async with session.post(server.url + "/v1/completions", json=body) as r:
                return r.status, await r.json()

    status, body = asyncio.run(ask())
    assert status == 503 and body["error"]["code"] == "engine_dead"
    assert "SIGKILL" in body["error"]["message"]
    assert server.terminate() == 0
