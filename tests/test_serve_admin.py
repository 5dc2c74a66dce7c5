"""Models loaded and unloaded at run time through `zllm serve`'s admin API, with real engine
processes on tiny checkpoints: a request that arrives while its model loads is answered once
it is ready; one model unloaded while it streams finishes that stream (drained, not aborted)
while the other keeps serving; a model loading past `--load-wait-timeout` answers 503 with
`Retry-After`; the admin routes take only the admin key."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest
from scripts.serve_process import ServerProcess, running_server

pytestmark = pytest.mark.timeout(180)
TINY = ["--kv-cache-memory-bytes", str(2**24), "--distributed-executor-backend", "uni"]
ADMIN = {"Authorization": "Bearer admin-secret"}


def _call(url: str, method: str = "GET", body: dict | None = None, headers=None, timeout=120):
    """(status, headers, JSON answer) of one call, error statuses included."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data, {"Content-Type": "application/json", **(headers or {})}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def _complete(url: str, model: str, max_tokens: int = 8):
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": max_tokens}
    return _call(url + "/v1/completions", "POST", {**body, "temperature": 0})


def _status(url: str) -> dict[str, str]:
    answer = _call(url + "/admin/models", headers=ADMIN)[2]
    return {m["id"]: m["status"] for m in answer["models"]}


def _engine_cores(server: ServerProcess) -> int:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    return sum("zllm.core.main" in " ".join(p.cmdline()) for p in children)


def _in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        result["answer"] = fn(*args)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _ws_generate(url: str, message: dict, headers: dict) -> dict:
    """One request over `/ws/generate`; its last message."""
    import asyncio

    import aiohttp

    async def run() -> dict:
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.ws_connect(url + "/ws/generate") as ws:
                await ws.send_json(message)
                while True:
                    reply = await ws.receive_json(timeout=120)
                    if reply.get("finished") or reply.get("type") == "error":
                        return reply

    return asyncio.run(run())


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    with running_server(
        "--model", tiny_checkpoints["llama"], "--api-key", "user-key",
        "--admin-api-key", "admin-secret", "--load-wait-timeout", "120", *TINY,
    ) as proc:  # fmt: skip
        yield proc


def test_admin_routes_take_only_the_admin_key(server):
    user = {"Authorization": "Bearer user-key"}
    assert _call(server.url + "/admin/models")[0] == 401
    assert _call(server.url + "/admin/models", headers=user)[0] == 401
    status, _, answer = _call(server.url + "/admin/models", headers=ADMIN)
    assert status == 200 and len(answer["models"]) == 1
    assert answer["models"][0]["status"] == "ready"


def test_load_answers_a_request_that_arrived_during_the_load(server, tiny_checkpoints):
    url = server.url
    user = {"Authorization": "Bearer user-key"}
    body = {"model": tiny_checkpoints["qwen2"], "name": "second"}
    loader, loaded = _in_thread(_call, url + "/admin/models", "POST", body, ADMIN)
    deadline = time.monotonic() + 30
    while _status(url).get("second") != "loading":
        assert time.monotonic() < deadline and loader.is_alive()
        time.sleep(0.02)
    assert _call(url + "/v1/models", headers=user)[2]["data"][-1]["id"] != "second"
    asked = {"model": "second", "prompt": "The capital of France is", "max_tokens": 8}
    early, answered = _in_thread(_call, url + "/v1/completions", "POST", asked, user)
    ws_asked = {"type": "generate", "request_id": "w", "model": "second", "prompt": "Hi"}
    ws_asked.update(max_tokens=4, stream=False)
    ws_early, ws_answered = _in_thread(_ws_generate, url, ws_asked, user)
    loader.join(120)
    early.join(120)
    ws_early.join(120)
    assert ws_answered["answer"].get("finished"), ws_answered["answer"]  # waited, not a 404
    assert ws_answered["at"] >= loaded["at"] - 0.5
    assert loaded["answer"][0] == 200, loaded["answer"]
    status, _, answer = answered["answer"]
    assert status == 200 and answer["model"] == "second", answer
    assert answered["at"] >= loaded["at"] - 0.5  # answered once the load was done
    assert _status(url)["second"] == "ready"
    assert [m["id"] for m in _call(url + "/v1/models", headers=user)[2]["data"]][-1] == "second"
    assert _call(url + "/admin/models", "POST", body, ADMIN)[0] == 409  # already served


def test_unload_drains_its_stream_while_the_other_model_serves(server, tiny_checkpoints):
    url, user = server.url, {"Authorization": "Bearer user-key"}
    if "second" not in _status(url):
        body = {"model": tiny_checkpoints["qwen2"], "name": "second"}
        assert _call(url + "/admin/models", "POST", body, ADMIN)[0] == 200
    cores = _engine_cores(server)
    streamed: dict = {"chunks": 0}

    def stream() -> None:
        body = {"model": "second", "prompt": "Hello", "max_tokens": 200, "stream": True}
        body.update(temperature=0, ignore_eos=True)
        request = urllib.request.Request(
            url + "/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", **user},
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    streamed["chunks"] += 1
                    streamed["finish"] = chunk["choices"][0]["finish_reason"] or streamed.get(
                        "finish"
                    )
        streamed["at"] = time.monotonic()

    streamer = threading.Thread(target=stream)
    streamer.start()
    while streamed["chunks"] == 0:
        assert streamer.is_alive()
        time.sleep(0.005)
    unloader, unloaded = _in_thread(_call, url + "/admin/models/second", "DELETE", None, ADMIN)
    seen = {_status(url).get("second")}
    other = _complete_with(url, user)  # while "second" drains
    while unloader.is_alive():
        seen.add(_status(url).get("second"))
        time.sleep(0.01)
    streamer.join(60)
    assert unloaded["answer"][0] == 200, unloaded["answer"]
    assert "draining" in seen
    assert streamed["finish"] == "length" and streamed["at"] <= unloaded["at"]
    assert other == 200  # the other model kept serving
    assert "second" not in _status(url)
    assert (
        _call(url + "/v1/completions", "POST", {"model": "second", "prompt": "x"}, user)[0] == 404
    )
    assert _engine_cores(server) == cores - 1  # its engine-core stopped


def _complete_with(url: str, headers: dict) -> int:
    body = {"prompt": "The capital of France is", "max_tokens": 4}
    return _call(url + "/v1/completions", "POST", body, headers)[0]


def test_a_request_for_a_model_loading_too_long_gets_503_retry_after(tiny_checkpoints):
    with running_server(
        "--model", tiny_checkpoints["llama"], "--admin-api-key", "admin-secret",
        "--load-wait-timeout", "0", *TINY,
    ) as server:  # fmt: skip
        body = {"model": tiny_checkpoints["qwen2"], "name": "slow"}
        loader, loaded = _in_thread(_call, server.url + "/admin/models", "POST", body, ADMIN)
        while _status(server.url).get("slow") != "loading":
            assert loader.is_alive()
            time.sleep(0.02)
        status, headers, answer = _complete(server.url, "slow")
        loader.join(120)
        assert status == 503 and answer["error"]["code"] == "model_loading"
        assert int(headers["Retry-After"]) >= 1
        assert loaded["answer"][0] == 200
        assert _complete(server.url, "slow")[0] == 200
