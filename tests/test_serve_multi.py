"""One `zllm serve` in front of several engines: two tiny models spawned with `--model` (one
with two replicas) and a third attached with `--engine NAME=ADDRESS` to a running daemon.
Each request is answered by the model it names (greedy equals a solo `LLM` run of that
checkpoint); `/v1/models` lists every name; `/health` reports per model and per replica."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from scripts.daemon_process import Daemon, free_port
from scripts.serve_process import ServerProcess, running_server

from zllm.frontend.llm import LLM
from zllm.protocol.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(180)
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
TINY = ["--kv-cache-memory-bytes", str(2**24), "--distributed-executor-backend", "uni"]


@pytest.fixture(scope="module")
def daemon(tiny_checkpoints):
    daemon = Daemon(tiny_checkpoints["qwen3"], f"tcp://127.0.0.1:{free_port()}")
    try:
        daemon.wait_for_log("engine-core ready")
        yield daemon
    finally:
        daemon.kill()


@pytest.fixture(scope="module")
def server(tiny_checkpoints, daemon):
    with running_server(
        "--model", tiny_checkpoints["llama"],
        "--model", tiny_checkpoints["qwen2"],
        "--replicas", "2",
        "--engine", f"remote={daemon.address}",
        *TINY,
    ) as proc:  # fmt: skip
        yield proc


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _complete(url: str, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    request = urllib.request.Request(
        url + "/v1/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        answer = json.loads(r.read())
    assert answer["model"] == model
    return answer["choices"][0]["text"]


def test_every_model_answers_as_its_solo_run(server, tiny_checkpoints):
    names = {
        tiny_checkpoints["llama"]: tiny_checkpoints["llama"],
        tiny_checkpoints["qwen2"]: tiny_checkpoints["qwen2"],
        "remote": tiny_checkpoints["qwen3"],
    }
    served = {name: [_complete(server.url, name, p) for p in PROMPTS] for name in names}
    for name, path in names.items():
        solo = LLM(model=path, distributed_executor_backend="uni", kv_cache_memory_bytes=2**24)
        try:
            params = SamplingParams(max_tokens=8, temperature=0)
            expected = [o.outputs[0].text for o in solo.generate(PROMPTS, params)]
        finally:
            solo.shutdown()
        assert served[name] == expected, name
    # Different random checkpoints: the routing is visible in the answers.
    assert len({tuple(texts) for texts in served.values()}) == 3


def test_models_and_health_list_every_model_and_replica(server, tiny_checkpoints):
    ids = [card["id"] for card in _get(server.url + "/v1/models")["data"]]
    assert ids == [tiny_checkpoints["llama"], tiny_checkpoints["qwen2"], "remote"]
    health = _get(server.url + "/health")["models"]
    assert health[tiny_checkpoints["llama"]]["replicas"] == [
        f"{tiny_checkpoints['llama']}#0",
        f"{tiny_checkpoints['llama']}#1",
    ]
    assert health["remote"]["healthy"] and health["remote"]["dead"] == []
    assert list(_get(server.url + "/health?model=remote")["models"]) == ["remote"]


def test_bad_engine_options_name_the_option(tiny_checkpoints):
    for args, option in [
        (["--engine", "no-address"], "--engine"),
        (["--replicas", "0"], "--replicas"),
        (["--model", "a", "--model", "a"], "--model"),
    ]:
        proc = ServerProcess(*args)
        try:
            assert proc.proc.wait(60) != 0
            assert option in proc.output()
        finally:
            proc.kill()


def _status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_restarted_daemon_rejoins_the_pool_on_its_own(server, daemon, tiny_checkpoints):
    """Last in this file: it kills the module's daemon. While it is down, `remote` is out of
    the pool (its health 503, requests fail at once) and the other models serve; a new daemon
    at the same address is back in the pool with no call to the server."""
    before = _complete(server.url, "remote", PROMPTS[0])
    daemon.kill()
    deadline = time.monotonic() + 10
    while _status_of(server.url + "/health?model=remote") != 503:
        assert time.monotonic() < deadline, "the dead daemon still looks healthy"
        time.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as failed:
        _complete(server.url, "remote", PROMPTS[0])
    assert failed.value.code == 503 and time.monotonic() - start < 2.0
    assert "no replica of model 'remote' is serving" in failed.value.read().decode()
    assert _complete(server.url, tiny_checkpoints["llama"], PROMPTS[0])
    restarted = Daemon(tiny_checkpoints["qwen3"], daemon.address)
    try:
        restarted.wait_for_log("engine-core ready")
        deadline = time.monotonic() + 30
        while _status_of(server.url + "/health?model=remote") != 200:
            assert time.monotonic() < deadline, "the restarted daemon did not rejoin"
            time.sleep(0.1)
        health = _get(server.url + "/health?model=remote")["models"]["remote"]
        assert health["replicas"] == [daemon.address] and health["reconnecting"] == []
        assert _complete(server.url, "remote", PROMPTS[0]) == before
    finally:
        restarted.kill()
