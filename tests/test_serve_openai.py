"""`zllm serve` on the default model, as its clients see it: the official `openai` package
(sync and async, streamed and not), raw HTTP for every error, client disconnects, the native
routes, the WebSocket and `/metrics`. One server for the module, started as a subprocess."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import aiohttp
import openai
import pytest
from scripts.serve_process import running_server

from zllm import LLM, SamplingParams

KEY = "test-key"
NAME = "smollm2"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 512
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
GREEDY = dict(temperature=0.0, max_tokens=12)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(default_model_path):
    with running_server(
        default_model_path,
        "--api-key", KEY,
        "--served-model-name", NAME, "smol-alias",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--distributed-executor-backend", "uni",
    ) as proc:  # fmt: skip
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _run(coro):
    return asyncio.run(coro)


async def _post(url: str, data: bytes | str | None = None, headers=None, json_body=None):
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, json=json_body, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()


# ---- the openai package ------------------------------------------------------------------------


def test_models_lists_every_served_name(client):
    assert [m.id for m in client.models.list().data] == [NAME, "smol-alias"]


def test_greedy_completion_equals_llm_generate(client, default_model_path):
    served = [
        client.completions.create(model=NAME, prompt=p, **GREEDY).choices[0].text for p in PROMPTS
    ]
    llm = LLM(
        model=default_model_path, max_model_len=MAX_MODEL_LEN, distributed_executor_backend="uni"
    )
    try:
        local = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(**GREEDY))]
    finally:
        llm.shutdown()
    assert served == local and all(served)


def test_completion_fields_usage_and_several_prompts(client, server):
    response = client.completions.create(
        model="smol-alias", prompt=PROMPTS[:2], n=2, logprobs=0, **GREEDY
    )
    assert response.object == "text_completion" and response.model == "smol-alias"
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text  # greedy: n copies
    assert all(c.finish_reason in ("stop", "length") for c in response.choices)
    usage = response.usage
    prompt_ids = [
        json.loads(_run(_post(server.url + "/tokenize", json_body={"prompt": p}))[2])["tokens"]
        for p in PROMPTS[:2]
    ]
    assert usage.prompt_tokens == sum(map(len, prompt_ids))  # once per prompt, not per choice
    assert usage.completion_tokens == sum(len(c.logprobs.tokens) for c in response.choices)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_echo_logprobs_and_token_prompts(client, server):
    tokens = _run(_post(server.url + "/tokenize", json_body={"prompt": PROMPTS[0]}))
    ids = json.loads(tokens[2])["tokens"]
    by_text = client.completions.create(model=NAME, prompt=PROMPTS[0], **GREEDY)
    by_ids = client.completions.create(model=NAME, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(
        model=NAME, prompt=PROMPTS[0], echo=True, logprobs=2, **GREEDY
    )
    choice = echoed.choices[0]
    assert choice.text == PROMPTS[0] + by_text.choices[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + echoed.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_streamed_completion_adds_up_with_usage_chunk(client):
    stream = client.completions.create(
        model=NAME, prompt=PROMPTS[1], stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model=NAME, prompt=PROMPTS[1], **GREEDY)
    assert text == whole.choices[0].text
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices][-1] in ("stop", "length")


def test_chat_streamed_and_not_agree(client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    ]
    whole = client.chat.completions.create(
        model=NAME, messages=messages, max_completion_tokens=10, temperature=0
    )
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_n2_streams_both_indices_and_logprobs(client):
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Say a word."}],
            n=2,
            max_tokens=6,
            temperature=1.0,
            seed=3,
            stream=True,
        )
    )
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    assert {c.choices[0].index for c in chunks} == {0, 1}
    done = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(done) == [0, 1]
    scored = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.logprob - 1e-6


def test_async_client_streams_and_not(server):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        whole, stream = await asyncio.gather(
            aclient.completions.create(model=NAME, prompt=PROMPTS[2], **GREEDY),
            aclient.chat.completions.create(
                model=NAME,
                messages=[{"role": "user", "content": "Hello"}],
                stream=True,
                **GREEDY,
            ),
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        models = await aclient.models.list()
        await aclient.close()
        return whole, "".join(parts), models

    whole, chat_text, models = _run(run())
    assert whole.choices[0].text and chat_text and models.data[0].id == NAME


# ---- errors, each followed by a request that works ---------------------------------------------


def _error_of(status: int, body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    return error


ERROR_CASES = [
    # (name, body, headers, status, param or None)
    ("malformed JSON", b'{"prompt": "x", ', AUTH, 400, None),
    ("wrong type", b'{"prompt": "x", "max_tokens": "ten"}', AUTH, 400, "max_tokens"),
    ("unknown field", b'{"prompt": "x", "frobnicate": 1}', AUTH, 400, "frobnicate"),
    ("negative max_tokens", b'{"prompt": "x", "max_tokens": -3}', AUTH, 400, "max_tokens"),
    ("beyond max_model_len", json.dumps({"prompt": "hello " * 700}).encode(), AUTH, 400, "prompt"),
    ("unknown model", b'{"prompt": "x", "model": "gpt-5"}', AUTH, 404, "model"),
    ("missing API key", b'{"prompt": "x"}', {}, 401, None),
    ("wrong API key", b'{"prompt": "x"}', {"Authorization": "Bearer nope"}, 401, None),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', AUTH, 400, None),
    ("10 MB body", b'{"prompt": "' + b"a" * 10_000_000 + b'"}', AUTH, 413, None),
    ("suffix", b'{"prompt": "x", "suffix": "y"}', AUTH, 400, "suffix"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_get_the_right_status_and_json(server, case):
    _, body, headers, status, param = case
    url = server.url + "/v1/completions"
    got, response_headers, raw = _run(
        _post(url, body, {**headers, "Content-Type": "application/json"})
    )
    assert got == status, raw[:300]
    assert response_headers["Content-Type"].startswith("application/json")
    error = _error_of(got, raw)
    if param is not None:
        assert error["param"] == param, error
    ok, _, raw = _run(_post(url, json_body={"prompt": "Hi", "max_tokens": 2}, headers=AUTH))
    assert ok == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2


def test_unknown_route_and_bad_chat_are_json_errors(server):
    status, _, raw = _run(_post(server.url + "/v1/nope", json_body={}, headers=AUTH))
    assert status == 404 and _error_of(status, raw)["type"] == "not_found_error"
    bad_part = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    status, _, raw = _run(
        _post(server.url + "/v1/chat/completions", json_body=bad_part, headers=AUTH)
    )
    assert status == 400 and _error_of(status, raw)["param"] == "messages[0].content[0]"
    with pytest.raises(openai.BadRequestError, match="tools"):
        openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x"}], tools=[]
        )


# ---- disconnects -------------------------------------------------------------------------------


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as r:
            return await r.text()


def test_dropped_streams_free_their_kv_blocks(server):
    async def drop_one(session: aiohttp.ClientSession, i: int) -> None:
        body = {
            "prompt": f"Story number {i}:",
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        response = await session.post(server.url + "/v1/completions", json=body, headers=AUTH)
        assert response.status == 200
        for _ in range(3):  # a few chunks: the request is running
            await response.content.readline()
        response.close()  # the connection goes away mid-stream

    async def run() -> tuple[float, float, float]:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(drop_one(session, i) for i in range(20)))
        dropped = time.monotonic()
        while True:
            text = await _metrics(server.url)
            used = _metric(text, "zllm:kv_cache_used_blocks")
            running = _metric(text, "zllm:num_requests_running")
            if (used, running) == (0, 0) or time.monotonic() - dropped > 10:
                return used, running, time.monotonic() - dropped
            await asyncio.sleep(0.05)

    used, running, seconds = _run(run())
    assert (used, running) == (0, 0), f"{used} KV blocks, {running} running after {seconds:.1f} s"


# ---- native routes, WebSocket, metrics ---------------------------------------------------------


def test_native_routes(server):
    async def run():
        async with aiohttp.ClientSession() as s:
            results = {}
            for path in ("/health", "/ping", "/version", "/models", "/v1/models"):
                async with s.get(server.url + path, headers=AUTH) as r:
                    results[path] = (r.status, await r.read())
            async with s.post(server.url + "/generate", json={"prompt": PROMPTS[0], **GREEDY}) as r:
                results["generate"] = (r.status, await r.json())
            body = {"prompt": PROMPTS[0], "stream": True, **GREEDY}
            async with s.post(server.url + "/generate", json=body) as r:
                lines = [json.loads(line) async for line in r.content if line.strip()]
                results["stream"] = (r.status, r.headers["Content-Type"], lines)
            ids = results["generate"][1]["outputs"][0]["token_ids"]
            async with s.post(server.url + "/detokenize", json={"tokens": ids}) as r:
                results["detokenize"] = (r.status, await r.json())
            async with s.post(
                server.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}
            ) as r:
                results["tokenize"] = (r.status, await r.json())
            async with s.post(server.url + "/generate", json={"prompt": "x", "top_k": "many"}) as r:
                results["bad"] = (r.status, await r.json())
            return results

    r = _run(run())
    assert r["/health"][0] == r["/ping"][0] == 200
    assert json.loads(r["/version"][1])["version"]
    assert json.loads(r["/models"][1]) == json.loads(r["/v1/models"][1])
    status, whole = r["generate"]
    assert status == 200 and whole["outputs"][0]["finish_reason"] in ("stop", "length")
    status, content_type, lines = r["stream"]
    assert status == 200 and content_type.startswith("application/x-ndjson")
    assert (
        "".join(o["text"] for line in lines for o in line["outputs"]) == whole["outputs"][0]["text"]
    )
    assert lines[-1]["finished"] and lines[-1]["usage"] == whole["usage"]
    assert r["detokenize"][1]["prompt"] == whole["outputs"][0]["text"]
    assert (
        r["tokenize"][0] == 200 and r["tokenize"][1]["count"] == len(r["tokenize"][1]["tokens"]) > 3
    )
    assert r["bad"][0] == 400 and r["bad"][1]["error"]["param"] == "top_k"


def test_websocket_interleaves_requests_and_survives_garbage(server):
    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(server.url + "/ws/generate") as ws:
                for i in range(10):
                    await ws.send_json(
                        {
                            "type": "generate",
                            "request_id": f"r{i}",
                            "prompt": f"{i} + {i} =",
                            "max_tokens": 3 + i % 4,
                            "ignore_eos": True,
                            "temperature": 0,
                            "stream": True,
                        }
                    )
                await ws.send_str("this is not JSON")
                await ws.send_json({"type": "generate", "request_id": "bad", "prompt": "x", "n": 0})
                messages, finished = [], set()
                while len(finished) < 10:
                    message = await ws.receive_json(timeout=60)
                    messages.append(message)
                    if message["type"] == "output" and message["finished"]:
                        finished.add(message["request_id"])
                await ws.send_json(
                    {"type": "generate", "request_id": "after", "prompt": "Hi", "max_tokens": 2}
                )
                after = await ws.receive_json(timeout=60)
                while after["type"] != "output":
                    messages.append(after)
                    after = await ws.receive_json(timeout=60)
                await ws.send_json({"type": "cancel", "request_id": "no-such"})
                cancel_error = await ws.receive_json(timeout=60)
                return messages, after, cancel_error

    messages, after, cancel_error = _run(run())
    outputs = [m for m in messages if m["type"] == "output"]
    tokens: dict[str, int] = {}
    for m in outputs:
        tokens[m["request_id"]] = tokens.get(m["request_id"], 0) + len(m["outputs"][0]["token_ids"])
    assert tokens == {f"r{i}": 3 + i % 4 for i in range(10)}
    order = [m["request_id"] for m in outputs]
    assert order != sorted(order, key=lambda rid: int(rid[1:])), "answers interleave"
    errors = [m for m in messages if m["type"] == "error"]
    assert len(errors) == 2
    assert errors[0]["request_id"] is None and "JSON" in errors[0]["error"]["message"]
    assert errors[1]["request_id"] == "bad" and errors[1]["error"]["param"] == "n"
    assert (
        after["request_id"] == "after"
        and after["finished"]
        and after["usage"]["completion_tokens"] == 2
    )
    assert cancel_error["type"] == "error" and cancel_error["request_id"] == "no-such"


def test_websocket_cancel_by_id(server):
    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(server.url + "/ws/generate") as ws:
                request = {"type": "generate", "request_id": "long", "prompt": "Once",
                           "max_tokens": 400, "ignore_eos": True, "stream": True}  # fmt: skip
                await ws.send_json(request)
                first = await ws.receive_json(timeout=60)
                await ws.send_json({"type": "cancel", "request_id": "long"})
                while True:
                    message = await ws.receive_json(timeout=60)
                    if message.get("finished"):
                        return first, message

    first, last = _run(run())
    assert first["request_id"] == "long" and last["outputs"][0]["finish_reason"] == "abort"
    assert last["usage"]["completion_tokens"] < 400


def test_metrics_carry_vllm_names_with_model_label(server):
    text = _run(_metrics(server.url))
    for name in (
        "zllm:num_requests_running",
        "zllm:num_requests_waiting",
        "zllm:kv_cache_usage_perc",
        "zllm:prefix_cache_queries_total",
        "zllm:prefix_cache_hits_total",
        "zllm:num_preemptions_total",
        "zllm:prompt_tokens_total",
        "zllm:generation_tokens_total",
        "zllm:time_to_first_token_seconds_count",
        "zllm:inter_token_latency_seconds_count",
        "zllm:e2e_request_latency_seconds_count",
        "zllm:request_queue_time_seconds_count",
    ):
        assert _metric(text, name) >= 0
    assert f'model_name="{NAME}"' in text
    assert _metric(text, "zllm:generation_tokens_total") > 0
    assert re.search(r'zllm:request_success_total\{finished_reason="length",model_name=', text)


# ---- zllm bench serve at a tiny size -----------------------------------------------------------


def test_bench_serve_runs_against_the_server(server, tmp_path):
    sharegpt = tmp_path / "sharegpt.json"
    turns = [
        {"conversations": [{"from": "human", "value": f"Tell me about the number {i} please."},
                           {"from": "gpt", "value": f"The number {i} is a fine number indeed."}]}
        for i in range(6)
    ]  # fmt: skip
    sharegpt.write_text(json.dumps(turns))
    common = ["--base-url", server.url, "--api-key", KEY, "--num-prompts", "4", "--json"]
    runs = {
        "random": ["--input-len", "8:16", "--output-len", "4", "--request-rate", "20"],
        "sharegpt": ["--dataset", "sharegpt", "--dataset-path", str(sharegpt), "--max-concurrency", "2"],
        "whole": ["--input-len", "8", "--output-len", "5", "--no-stream"],
    }  # fmt: skip
    for name, args in runs.items():
        out = subprocess.run(
            [sys.executable, "-m", "zllm.frontend.cli", "bench", "serve", *common, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        doc = json.loads(out.stdout.strip().splitlines()[-1])
        assert {"bench", "date", "commit", "command", "model", "workload"} <= doc.keys()
        (r,) = doc["results"]
        assert r["completed"] == 4 and r["failed"] == 0, (name, r)
        assert r["request_throughput"] > 0 and r["output_token_throughput"] > 0
        assert r["e2e_ms"]["p50"] > 0 and doc["workload"]["stream"] == (name != "whole")
        for metric in ("ttft_ms", "tpot_ms", "itl_ms"):
            if name == "whole":  # no chunks to time
                assert r[metric] is None
            else:
                assert set(r[metric]) == {"mean", "p50", "p90", "p99"} and r[metric]["p50"] > 0
        if name == "random":
            assert r["output_tokens"] == 16
        if name == "whole":
            assert r["output_tokens"] == 20 and r["prompt_tokens"] == 32
