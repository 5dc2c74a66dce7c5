"""`zllm serve` under load, on a tiny checkpoint with one batch slot, a priority scheduler and
a queue of at most 4 (`--max-queued-requests 4`): overload is refused with 503 and
`Retry-After` at once and no accepted request is lost; a later urgent request overtakes
earlier ones."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest
from scripts.serve_process import running_server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    with running_server(
        tiny_checkpoints["llama"],
        "--max-num-seqs", "1",
        "--scheduling-policy", "priority",
        "--max-queued-requests", "4",
        "--distributed-executor-backend", "uni",
        "--kv-cache-memory-bytes", str(2**24),
    ) as proc:  # fmt: skip
        yield proc


def _body(max_tokens: int, priority: int = 0, stream: bool = False) -> dict:
    return {
        "prompt": "Count with me: one two three",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "priority": priority,
        "stream": stream,
    }


async def _metrics(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as r:
        return await r.text()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def test_overload_is_refused_at_once_and_nothing_accepted_is_lost(server):
    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, dict, float, str | None]:
        start = time.monotonic()
        async with session.post(server.url + "/v1/completions", json=_body(4)) as r:
            body = await r.json()
            return r.status, body, time.monotonic() - start, r.headers.get("Retry-After")

    async def run():
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(one(session, i) for i in range(50)))
            return results, await _metrics(session, server.url)

    results, metrics = asyncio.run(run())
    accepted = [body for status, body, _, _ in results if status == 200]
    refused = [(body, seconds, retry) for status, body, seconds, retry in results if status == 503]
    assert len(accepted) + len(refused) == 50, [r[0] for r in results]
    assert refused and len(accepted) >= 5  # 1 running + 4 queued at least
    for body in accepted:  # every accepted request completed in full
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 4
    for body, _, retry in refused:
        assert retry is not None and int(retry) >= 1
        assert (
            body["error"]["code"] == "overloaded"
            and "max_queued_requests" in body["error"]["message"]
        )
    slowest_refusal = max(seconds for _, seconds, _ in refused)
    slowest_accepted = max(seconds for status, _, seconds, _ in results if status == 200)
    assert slowest_refusal < slowest_accepted  # refused at once, not after waiting in line
    assert _metric(metrics, "zllm:request_rejected_total") == len(refused)


def test_a_later_urgent_request_finishes_before_earlier_ones(server):
    async def post(session, body, name, order):
        async with session.post(server.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            await r.read()
            order.append(name)

    async def _waiting(session) -> float:
        return _metric(await _metrics(session, server.url), "zllm:num_requests_waiting")

    async def run() -> list[str]:
        order: list[str] = []
        async with aiohttp.ClientSession() as session:
            # The one slot is busy with a long request, seen streaming.
            busy = await session.post(
                server.url + "/v1/completions", json=_body(300, priority=0, stream=True)
            )
            await busy.content.readline()
            lows = []
            for i in range(3):  # queued one after the other: their arrival order is known
                body = _body(4, priority=10)
                lows.append(asyncio.ensure_future(post(session, body, f"low{i}", order)))
                while await _waiting(session) < i + 1:
                    await asyncio.sleep(0.02)
            urgent = asyncio.ensure_future(post(session, _body(4, priority=-5), "urgent", order))
            await busy.read()
            order.append("busy")
            await asyncio.gather(urgent, *lows)
        return order

    order = asyncio.run(run())
    assert order.index("urgent") < min(order.index(f"low{i}") for i in range(3)), order
    assert [name for name in order if name.startswith("low")] == ["low0", "low1", "low2"]


def test_vllm_api_server_import_path():
    """vLLM's way to start the server from a script: the same names under `zllm.`."""
    from zllm.entrypoints.openai.api_server import run_server
    from zllm.entrypoints.openai.cli_args import make_arg_parser
    from zllm.utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        [
            "some-model",
            "--port",
            "9001",
            "--max-queued-requests",
            "4",
            "--scheduling-policy",
            "priority",
        ]
    )
    assert (args.model_tag, args.port, args.max_queued_requests) == ("some-model", 9001, 4)
    with pytest.raises(TypeError, match="uvicorn"):
        asyncio.run(run_server(args, ssl_keyfile="key.pem"))
