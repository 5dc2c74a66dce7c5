"""One `zllm engine-core` daemon shared by real client processes, as an operator runs it.

The daemon listens on tcp://127.0.0.1 and its checkpoint is deleted once it is ready: its
clients (each in another working directory) can only use what the daemon sends them. Over
it: three concurrent clients match solo runs, a SIGKILLed client is forgotten and its
blocks freed within `--client-timeout` + 1 s while the others stream on, a daemon stopped
for 5 s keeps its clients, and 10,000 hostile frames are dropped and counted while it
still serves.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time

import msgspec
import pytest
from conftest import with_max_positions
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from scripts.daemon_process import Daemon, free_port
from scripts.raw_client import RawClient
from scripts.scenario_process import SCRIPTS

from zllm import AsyncLLM, EngineArgs, EngineDeadError, SamplingParams
from zllm.protocol import messages as m
from zllm.protocol.process import core_addresses

CLIENT_TIMEOUT_S = 2.0
PROMPTS = [
    ["The capital of France is", "def fibonacci(n):"],
    ["Once upon a time", "1, 2, 3, 4,"],
    ["Hello, my name is", "The best way to learn"],
]
SHORT = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(tiny_checkpoints, tmp_path_factory):
    """(daemon, reference tokenizer, a connected in-process client)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("daemon")
    model = with_max_positions(tiny_checkpoints["llama"], root / "model")
    daemon = Daemon(
        model, f"tcp://127.0.0.1:{free_port()}", "--client-timeout", str(CLIENT_TIMEOUT_S)
    )
    try:
        daemon.wait_for_log("engine-core ready")
        reference = AutoTokenizer.from_pretrained(model)
        shutil.rmtree(model)  # from now on only the daemon has the model
        engine = AsyncLLM(EngineArgs(engine_core_address=daemon.address))
        yield daemon, reference, engine
        engine.shutdown()
        assert daemon.stop() == 0, daemon.output()[-3000:]
    finally:
        daemon.kill()


async def _final(engine: AsyncLLM, prompt: str) -> dict:
    out = None
    async for output in engine.generate(prompt, SHORT):
        out = output
    return {"prompt_token_ids": out.prompt_token_ids, "token_ids": out.outputs[0].token_ids}


@pytest.mark.timeout(180)
def test_three_client_processes_match_solo_runs_and_a_killed_one_is_forgotten(
    served, tmp_path
) -> None:
    daemon, reference, engine = served
    solo = {p: asyncio.run(_final(engine, p)) for prompts in PROMPTS for p in prompts}
    for prompt, out in solo.items():  # the fetched tokenizer is the checkpoint's
        assert out["prompt_token_ids"] == reference.encode(prompt)

    files = tmp_path / "engine-files"  # a fresh cache: these clients fetch the files
    clients = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "daemon_client.py"), daemon.address, *prompts],
            cwd=tmp_path,  # not the repository, not the model's folder
            env=dict(os.environ, ZLLM_ENGINE_FILES=str(files), PYTHONPATH=str(SCRIPTS)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for prompts in PROMPTS
    ]
    try:
        lines = [[] for _ in clients]

        def next_line(i: int) -> dict:
            line = clients[i].stdout.readline()
            assert line, f"client {i} exited with {clients[i].wait()}"
            lines[i].append(line)
            return msgspec.json.decode(line)

        assert all(next_line(i) == {"connected": True} for i in range(3))
        for client in clients:  # all three generate at the same time
            client.stdin.write("go\n")
            client.stdin.flush()
        for i, prompts in enumerate(PROMPTS):
            outputs = next_line(i)["outputs"]
            for prompt, out in zip(prompts, outputs):
                assert out["token_ids"] == solo[prompt]["token_ids"], (i, prompt)
                assert out["prompt_token_ids"] == solo[prompt]["prompt_token_ids"]
                assert out["text"] == reference.decode(out["token_ids"])

        # All three stream; one is killed. The other two keep streaming: each completes
        # whole streams after the killed one's were aborted and its blocks freed.
        assert all(next_line(i) == {"streaming": True} for i in range(3))
        clients_before = asyncio.run(engine.get_stats()).num_clients
        clients[0].kill()
        killed = time.monotonic()
        while (stats := asyncio.run(engine.get_stats())).num_clients == clients_before:
            assert time.monotonic() - killed < CLIENT_TIMEOUT_S + 1, "the killed client lingers"
            time.sleep(0.05)
        forgotten_s = time.monotonic() - killed
        assert forgotten_s < CLIENT_TIMEOUT_S + 1
        # Its request was aborted with it (the others run one each); abort frees the blocks.
        assert stats.num_running + stats.num_waiting <= 2, (stats, daemon.output()[-3000:])
        forgotten = time.monotonic()
        for i in (1, 2):  # the others stream on: whole streams, one begun after the forget
            while (line := next_line(i))["started"] < forgotten:
                assert line["long_tokens"] == 600, lines[i]
            assert line["long_tokens"] == 600, lines[i]
            clients[i].stdin.write("stop\n")
            clients[i].stdin.flush()
        for i in (1, 2):
            while "ok" not in (last := next_line(i)):
                assert last["long_tokens"] == 600, lines[i]
        assert clients[1].wait(30) == 0 and clients[2].wait(30) == 0
        stats = asyncio.run(engine.get_stats())
        assert stats.num_running == stats.kv_blocks_used == 0, stats
        assert (files / engine.client.ready.model_files_digest / "tokenizer.json").is_file()
    finally:
        for client in clients:
            client.kill()
            client.wait()


@pytest.mark.timeout(120)
def test_a_daemon_stopped_for_5_s_keeps_its_clients(served) -> None:
    daemon, _, engine = served
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main() -> list[int]:
        started = [asyncio.Event(), asyncio.Event()]

        async def stream(i: int) -> int:
            tokens = 0
            async for out in engine.generate(f"Stream {i} says", long):
                started[i].set()
                tokens = len(out.outputs[0].token_ids)
            return tokens

        tasks = [asyncio.create_task(stream(i)) for i in range(2)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(5)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    assert asyncio.run(main()) == [400, 400]
    assert asyncio.run(engine.get_stats()).num_clients >= 1


@pytest.mark.timeout(120)
def test_a_daemon_silent_beyond_heartbeat_timeout_fails_requests_then_is_reconnected(
    served,
) -> None:
    """Slow is not gone: only `heartbeat_timeout` of silence fails a client's requests; the
    client then reconnects by itself once the daemon answers again."""
    daemon, _, _ = served
    engine = AsyncLLM(EngineArgs(engine_core_address=daemon.address, heartbeat_timeout=2.0))
    long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)

    async def stopped_while_streaming() -> tuple[float, str]:
        stopped = 0.0
        try:
            async for _ in engine.generate("Streaming when the daemon stops", long):
                if not stopped:
                    os.kill(daemon.pid, signal.SIGSTOP)
                    stopped = time.monotonic()
        except EngineDeadError as e:
            return time.monotonic() - stopped, str(e)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        raise AssertionError("the stream ended although the daemon was stopped")

    try:
        failed_after, error = asyncio.run(stopped_while_streaming())
        assert 2.0 <= failed_after < 5.0 and "lost the connection" in error, (failed_after, error)
        assert len(asyncio.run(_final(engine, "Back again"))["token_ids"]) == 12
    finally:
        engine.shutdown()


@pytest.mark.timeout(120)
def test_a_silent_client_is_forgotten_its_requests_aborted_and_it_is_told(served) -> None:
    daemon, _, engine = served
    client = RawClient(*core_addresses(daemon.address))  # sends no heartbeats
    try:
        long = SamplingParams(max_tokens=30000, temperature=0, ignore_eos=True)
        ids = [f"silent-{i}" for i in range(8)]
        for rid in ids:
            client.send(m.AddRequest(request_id=rid, prompt_token_ids=[7, 8], sampling_params=long))
        time.sleep(CLIENT_TIMEOUT_S + 1.5)
        tokens = dict.fromkeys(ids, 0)
        while client.from_core.poll(0):
            message = m.decode_core_message(client.from_core.recv())
            for update in getattr(message, "updates", []):
                assert update.finish_reason is None, update  # cut off, not finished
                tokens[update.request_id] += len(update.new_token_ids)
        assert all(0 < n < 30000 for n in tokens.values()), tokens
        stats = asyncio.run(engine.get_stats())
        assert stats.num_running == stats.kv_blocks_used == 0, stats

        client.send(m.Heartbeat())
        reply = client.recv(10)
        assert isinstance(reply, m.Disconnected) and "client timeout" in reply.error
    finally:
        client.close()


# ---- hostile frames ----------------------------------------------------------------------------

_PARAMS = SamplingParams(max_tokens=2, temperature=0)
VALID = [
    m.encode(msg)
    for msg in (
        m.AddRequest(request_id="v1", prompt_token_ids=[5, 6, 7], sampling_params=_PARAMS),
        m.AddRequests(
            requests=[
                m.AddRequest(request_id="v2", prompt_token_ids=[5], sampling_params=_PARAMS),
                m.AddRequest(request_id="v3", prompt_token_ids=[6, 7], sampling_params=_PARAMS),
            ]
        ),
        m.AbortRequests(request_ids=["v1", "v2"]),
        m.UtilityCall(call_id=1, method="get_stats"),
        m.Hello(protocol_version=m.PROTOCOL_VERSION, client_name="x"),
    )
]
TAGS = ["Hello", "AddRequest", "AddRequests", "AbortRequests", "UtilityCall", "Goodbye", "X"]
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_hostile = st.fixed_dictionaries(
    {"type": st.sampled_from(TAGS)},
    optional={
        field: _values
        for field in (
            "request_id",
            "prompt_token_ids",
            "sampling_params",
            "requests",
            "request_ids",
            "call_id",
            "method",
            "args",
        )
    },
)
FRAMES = st.one_of(
    st.binary(max_size=64),  # garbage
    _values.map(msgspec.msgpack.encode),  # msgpack of the wrong shape
    _hostile.map(msgspec.msgpack.encode),  # the right tags, hostile fields
    st.tuples(st.sampled_from(VALID), st.integers(0, 10**6)).map(
        lambda t: t[0][: t[1] % len(t[0])]  # truncated
    ),
    st.tuples(st.sampled_from(VALID), st.integers(0, 10**6), st.integers(1, 255)).map(
        lambda t: _flip(t[0], t[1] % len(t[0]), t[2])  # corrupted
    ),
)


def _flip(frame: bytes, at: int, mask: int) -> bytes:
    return frame[:at] + bytes([frame[at] ^ mask]) + frame[at + 1 :]


def _drain(client: RawClient) -> None:
    while client.from_core.poll(0):
        client.from_core.recv()


def _may_send(frame: bytes) -> bool:
    """Frames that decode are real messages: the fuzz sends only harmless ones of those (no
    request that would run, no call that would put the engine to sleep)."""
    try:
        message = m.decode_client_message(frame)
    except msgspec.MsgspecError:
        return True
    return isinstance(message, m.AbortRequests | m.Heartbeat)


@pytest.mark.timeout(300)
def test_10000_hostile_frames_are_dropped_counted_and_the_core_still_serves(served) -> None:
    daemon, _, engine = served
    before = asyncio.run(engine.get_stats()).num_rejected_frames
    client = RawClient(*core_addresses(daemon.address))
    sent = {"frames": 0, "undecodable": 0}

    @settings(
        max_examples=1100,  # 11,000 frames, less the few real messages not sent
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(FRAMES, min_size=10, max_size=10), st.booleans())
    def send_frames(frames: list[bytes], on_output_socket: bool) -> None:
        sock = client.from_core if on_output_socket else client.to_core
        for frame in frames:
            if not _may_send(frame):
                continue
            sock.send(frame)
            sent["frames"] += 1
            try:
                m.decode_client_message(frame)
            except msgspec.MsgspecError:
                sent["undecodable"] += 1
        _drain(client)

    try:
        send_frames()
        client.to_core.send_multipart([b"two", b"parts"])
        client.to_core.send(b"\0" * (m.MAX_FRAME_BYTES + 1))  # over the limit: not read
        rejected = sent["undecodable"] + 2
        assert sent["frames"] >= 10_000, sent

        # It still serves: a real request from the same client (saying Hello again, in case
        # it was silent long enough to be forgotten), and from a well-behaved one.
        client.from_core.send(m.encode(m.Hello(protocol_version=m.PROTOCOL_VERSION)))
        greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        client.send(
            m.AddRequest(request_id="real", prompt_token_ids=[9, 10], sampling_params=greedy)
        )
        deadline = time.monotonic() + 60
        tokens: list[int] = []
        while len(tokens) < 6:
            assert client.from_core.poll(int(max(0, deadline - time.monotonic()) * 1000))
            message = m.decode_core_message(client.from_core.recv())
            if isinstance(message, m.StepOutputs):
                tokens += [
                    t for u in message.updates if u.request_id == "real" for t in u.new_token_ids
                ]
        out = asyncio.run(_final(engine, "Still serving"))
        assert len(out["token_ids"]) == 12
        stats = asyncio.run(engine.get_stats())
        assert stats.num_rejected_frames - before == rejected, (stats, sent)
    finally:
        client.close()
    assert daemon.proc.poll() is None


@pytest.mark.timeout(180)
def test_zllm_serve_attaches_to_the_daemon_and_leaves_it_running(served) -> None:
    """`zllm serve --engine-core-address`: the server's greedy text is the daemon's, and
    stopping the server stops neither the daemon nor its other clients."""
    import json
    import urllib.request

    from scripts.serve_process import ServerProcess

    daemon, _, engine = served
    server = ServerProcess("--engine-core-address", daemon.address)
    try:
        server.wait_ready()
        with urllib.request.urlopen(server.url + "/v1/models", timeout=30) as response:
            name = json.load(response)["data"][0]["id"]
        body = {"model": name, "prompt": PROMPTS[0][0], "max_tokens": 12, "temperature": 0}
        body["ignore_eos"] = True
        request = urllib.request.Request(
            server.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            text = json.load(response)["choices"][0]["text"]
        assert server.terminate() == 0, server.output()
    finally:
        server.kill()

    async def direct() -> str:
        outputs = [out async for out in engine.generate(PROMPTS[0][0], SHORT)]
        return outputs[-1].outputs[0].text

    assert asyncio.run(direct()) == text  # the daemon still serves its other client
    assert daemon.proc.poll() is None
