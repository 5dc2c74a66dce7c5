"""A daemon's life as systemd and its clients see it: the notify protocol (a real datagram
socket in the abstract namespace, as systemd's), watchdog pings that stop when the busy loop
is stuck, a drain on SIGTERM, and clients that outlive a restart."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import with_max_positions
from scripts.daemon_process import Daemon
from scripts.raw_client import RawClient
from scripts.scenario_process import SCRIPTS

from zllm import LLM, AsyncLLM, EngineArgs, EngineDeadError, SamplingParams
from zllm.protocol import messages as m
from zllm.protocol.process import core_addresses

WATCHDOG_USEC = 400_000  # pings every 0.2 s
GROUP = "daemon"  # a group every Linux system has
NOBODY = 65534  # the user "nobody"


class NotifySocket:
    """The datagram socket systemd owns (`$NOTIFY_SOCKET`): every line received, timestamped."""

    def __init__(self) -> None:
        self.name = f"@zllm-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.2)
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            self.lines += [(now, line) for line in data.decode().splitlines()]

    def wait_for(self, prefix: str, timeout: float, since: float = 0.0) -> float:
        """When the first line starting with `prefix` (after `since`) arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for t, line in list(self.lines):
                if t >= since and line.startswith(prefix):
                    return t
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} within {timeout} s: {self.lines[-10:]}")

    def times(self, line: str, start: float, end: float) -> list[float]:
        return [t for t, text in list(self.lines) if text == line and start <= t <= end]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.timeout(240)
def test_notify_watchdog_from_the_busy_loop_and_drain_on_sigterm(tiny_checkpoints, tmp_path):
    notify = NotifySocket()
    address = f"ipc://{tmp_path}/core"
    daemon = Daemon(
        with_max_positions(tiny_checkpoints["llama"], tmp_path / "model"),
        address,
        "--drain-timeout",
        "3",
        backend="mp",  # a worker process: stopping it stalls the busy loop inside a step
        env={"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )
    engine = None
    try:
        ready_at = notify.wait_for("READY=1", 120)
        assert "engine-core ready" in daemon.output(), "READY=1 before the model was loaded"
        assert notify.wait_for("EXTEND_TIMEOUT_USEC=", 0) < ready_at
        engine = AsyncLLM(EngineArgs(engine_core_address=address))
        time.sleep(1.0)
        pings = notify.times("WATCHDOG=1", ready_at, ready_at + 1.0)
        assert len(pings) >= 4, pings  # every 0.2 s
        status = [line for _, line in notify.lines if line.startswith("STATUS=serving")]
        assert status and "clients" in status[-1] and "KV blocks" in status[-1], status

        # A stuck step (its worker stopped) stalls the busy loop: the pings stop.
        [worker] = psutil.Process(daemon.pid).children()
        long = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)

        async def stalled_stream() -> tuple[int, list[float]]:
            tokens, stopped = 0, 0.0
            async for out in engine.generate("Stall here", long):
                tokens = len(out.outputs[0].token_ids)
                if not stopped:
                    worker.suspend()
                    stopped = time.monotonic()
                    await asyncio.sleep(1.5)
                    worker.resume()
            return tokens, notify.times("WATCHDOG=1", stopped + 0.3, stopped + 1.5)

        tokens, pings_while_stalled = asyncio.run(stalled_stream())
        assert tokens == 300 and pings_while_stalled == [], pings_while_stalled
        assert notify.times("WATCHDOG=1", time.monotonic() - 1, time.monotonic()), "resumed"

        # SIGTERM during 8 streams: the short ones finish, the long ones are aborted.
        async def drain() -> tuple[float, list]:
            started = [asyncio.Event() for _ in range(8)]

            async def stream(i: int) -> tuple:
                params = SamplingParams(
                    max_tokens=30 if i < 4 else 30000, temperature=0, ignore_eos=True
                )
                n = 0
                try:
                    async for out in engine.generate(f"Stream {i} says", params):
                        started[i].set()
                        n = len(out.outputs[0].token_ids)
                        if out.finished:
                            return ("finished", n, time.monotonic())
                except EngineDeadError as e:
                    return ("aborted", str(e), time.monotonic())
                return ("ended", n, time.monotonic())

            tasks = [asyncio.create_task(stream(i)) for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            termed = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            return termed, await asyncio.wait_for(asyncio.gather(*tasks), 60)

        termed, results = asyncio.run(drain())
        assert notify.wait_for("STOPPING=1", 1, since=termed) - termed < 1
        for outcome, detail, _ in results[:4]:
            assert (outcome, detail) == ("finished", 30), results
        assert any(at > termed for _, _, at in results[:4]), "nothing ran during the drain"
        for outcome, detail, at in results[4:]:
            assert outcome == "aborted" and "engine shutting down" in detail, results
            assert at - termed > 2.5, "aborted before the drain timeout"
        assert daemon.proc.wait(30) == 0, daemon.output()[-3000:]
        assert not list(Path(tmp_path).glob("core.*")), "socket files left behind"
    finally:
        if engine is not None:
            engine.shutdown()
        daemon.kill()
        notify.close()


@pytest.mark.timeout(180)
def test_clients_outlive_a_daemon_restart(tiny_checkpoints, tmp_path):
    """In-flight calls raise (within 2 s of the daemon's death, or with the drain's reason
    when it is stopped by SIGTERM), new ones fail fast while nothing listens, and once a
    daemon is back a new request just works."""
    address = f"ipc://{tmp_path}/core"
    model = tiny_checkpoints["llama"]
    first = Daemon(model, address)
    second = third = None
    engine = AsyncLLM(EngineArgs(engine_core_address=address))
    long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=8, temperature=0)

    async def final(prompt: str) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(prompt, short):
            tokens = out.outputs[0].token_ids
        return tokens

    async def killed_while_streaming() -> tuple[float, str]:
        try:
            async for _ in engine.generate("Streaming when the daemon dies", long):
                if first.proc.poll() is None:
                    first.kill()
                    killed = time.monotonic()
        except EngineDeadError as e:
            return time.monotonic() - killed, str(e)
        raise AssertionError("the stream outlived its daemon")

    try:
        before = asyncio.run(final("Hello again"))
        latency, error = asyncio.run(killed_while_streaming())
        assert latency < 2.0 and "lost the connection to engine-core" in error, (latency, error)

        start = time.monotonic()  # nothing listens now: a new request fails fast
        with pytest.raises(EngineDeadError, match="no engine-core is listening|closed the conn"):
            asyncio.run(final("Anyone there?"))
        assert time.monotonic() - start < 2.0
        assert not engine.errored, "the client itself lives on"

        assert stat.S_IMODE(os.stat(f"{tmp_path}/core.in").st_mode) == 0o600  # the default
        second = Daemon(model, address, "--socket-group", GROUP, "--drain-timeout", "0.5")
        second.wait_for_log("listening on")
        shared = os.stat(f"{tmp_path}/core.out")
        assert stat.S_IMODE(shared.st_mode) == 0o660 and shared.st_gid == grp.getgrnam(GROUP).gr_gid
        assert asyncio.run(final("Hello again")) == before  # waits for the new daemon's Ready
        assert engine.is_running

        # A restart as systemd does it: SIGTERM (a drain, exit 0), then a new daemon. The
        # stream in flight ends with the drain's reason; the next request just works.
        async def drained_while_streaming() -> tuple[int, str]:
            tokens = 0
            try:
                async for out in engine.generate("Streaming through a restart", long):
                    if not tokens:  # one SIGTERM, as systemd sends (a second stops at once)
                        second.proc.terminate()
                    tokens = len(out.outputs[0].token_ids)
            except EngineDeadError as e:
                return tokens, str(e)
            raise AssertionError("the stream outlived the drain")

        tokens, error = asyncio.run(drained_while_streaming())
        assert tokens < 1000 and "engine shutting down" in error, (tokens, error)
        assert second.proc.wait(30) == 0, second.output()[-3000:]
        third = Daemon(model, address)
        third.wait_for_log("listening on")
        assert asyncio.run(final("Hello again")) == before
        engine.shutdown()
        assert third.stop() == 0
    finally:
        engine.shutdown()
        for daemon in (first, second, third):
            if daemon is not None:
                daemon.kill()


@pytest.mark.timeout(120)
def test_ipc_roles_follow_the_peer_uid(tiny_checkpoints):
    """An ipc client running as the daemon's user may put the engine to sleep; a process of
    another user (let in by --socket-group) runs requests alike but may not."""
    folder = tempfile.mkdtemp(prefix="zllm-roles-")
    os.chmod(folder, 0o755)  # others may reach the sockets: their own mode decides
    address = f"ipc://{folder}/core"
    daemon = Daemon(tiny_checkpoints["llama"], address, "--socket-group", GROUP)
    llm = raw = None
    try:
        daemon.wait_for_log("engine-core ready")
        llm = LLM(engine_core_address=address)
        llm.sleep()
        assert llm.is_sleeping()
        llm.wake_up()
        if os.geteuid() != 0:
            pytest.skip("a client process of another user needs root to start")

        raw = RawClient(*core_addresses(address))
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        raw.send(m.AddRequest(request_id="r", prompt_token_ids=[5, 6, 7], sampling_params=params))
        expected = [t for u in raw.updates_until_finished({"r"}, 60)["r"] for t in u.new_token_ids]
        other = subprocess.run(
            [sys.executable, str(SCRIPTS / "non_admin_client.py"), address, str(NOBODY)]
            + [str(grp.getgrnam(GROUP).gr_gid)],
            env=dict(os.environ, PYTHONPATH=str(SCRIPTS)),
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert other.returncode == 0, other.stderr[-3000:]
        out = json.loads(other.stdout)
        assert out["tokens"] == expected and len(expected) == 4, out
        assert out["kind"] == "permission" and "sleep changes the engine" in out["sleep_error"]
        assert not llm.is_sleeping()
    finally:
        if raw is not None:
            raw.close()
        if llm is not None:
            llm.shutdown()
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)
