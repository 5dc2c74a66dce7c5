"""The process layout a user gets: frontend, engine-core and worker are separate OS processes,
`shutdown()` leaves none of them and no socket file behind, and `make run`'s command answers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zllm import AsyncLLM, EngineArgs, RequestOutputKind, SamplingParams
from zllm.frontend.cli import stream_to

# ---- /proc helpers (Linux) -------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie holds nothing (no memory, no sockets, no device)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == pid:
                pids.append(int(entry))
    return pids


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def unix_socket_paths(pid: int) -> set[str]:
    """Paths of the unix sockets a process has open (bound or connected), from /proc/net/unix."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    paths = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[6] in inodes and parts[7].startswith("/"):
            paths.add(parts[7])
    return paths


def ipc_path(address: str) -> str:
    assert address.startswith("ipc://"), address
    return address[len("ipc://") :]


# ---- the engine's processes ---------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_core_and_worker_are_separate_processes_and_shutdown_leaves_nothing(
    tiny_checkpoints: dict[str, str],
) -> None:
    engine = AsyncLLM(EngineArgs(model=tiny_checkpoints["llama"], max_model_len=256))
    try:
        client = engine.client
        core = client.proc.pid
        assert client.ready.core_pid == core
        workers = children(core)
        sockets = {ipc_path(client.input_address), ipc_path(client.output_address)}
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

        async def generate_while_looking() -> tuple[str, list[int], set[int]]:
            """Stream a request and look at the processes while it is in flight."""
            seen: set[int] = set()
            text, tokens = "", []
            async for out in engine.generate(
                "Hello", params.clone(output_kind=RequestOutputKind.DELTA)
            ):
                if not seen:
                    seen = {pid for pid in [core, *workers] if alive(pid)}
                text += out.outputs[0].text
                tokens += out.outputs[0].token_ids
            return text, tokens, seen

        text, tokens, seen = asyncio.run(generate_while_looking())
        assert len(tokens) == 8
        assert len(workers) == 1, f"expected one worker under engine-core, found {workers}"
        [worker] = workers
        assert seen == {core, worker}, "engine-core and worker run while the request streams"
        assert len({os.getpid(), core, worker}) == 3
        assert int(_stat(core)[1]) == os.getpid(), "engine-core is the frontend's child"
        assert "zllm.core.main" in cmdline(core) and "zllm.worker.main" in cmdline(worker)
        for path in sockets:
            assert Path(path).exists(), path
            assert oct(Path(path).stat().st_mode & 0o777) == oct(0o600), f"{path} is not private"
        # The core <-> worker socket too: whatever unix socket paths the two have open.
        sockets |= unix_socket_paths(core) | unix_socket_paths(worker)
        assert len(sockets) >= 3

        # What the CLI prints is what the stream carried, piece by piece.
        class Recorder:
            def __init__(self) -> None:
                self.writes: list[str] = []

            def write(self, s: str) -> None:
                self.writes.append(s)

            def flush(self) -> None:
                pass

        out = Recorder()
        answer = asyncio.run(
            stream_to(engine, "Hello", params.clone(output_kind=RequestOutputKind.DELTA), out)
        )
        assert answer == text and "".join(out.writes) == text
        assert len(out.writes) > 1, "the answer was printed in one piece, not streamed"
    finally:
        engine.shutdown()

    left = [pid for pid in (core, worker) if alive(pid)]
    assert not left, f"processes still alive after shutdown(): {left}"
    leftover_files = sorted(p for p in sockets if os.path.exists(p))
    assert not leftover_files, f"socket files left behind: {leftover_files}"
    leftover_dirs = sorted({d for d in map(os.path.dirname, sockets) if os.path.isdir(d)})
    assert not leftover_dirs, f"socket directories left behind: {leftover_dirs}"


# ---- `make run` ------------------------------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_zllm_generate_chat_answers_paris(default_model_path: str) -> None:
    """What `make run` runs: the `zllm` console script, full stack, default model."""
    zllm = Path(sys.executable).with_name("zllm")
    assert zllm.is_file(), (
        f"{zllm} missing: install zllm (`make install`) to get the console script"
    )
    result = subprocess.run(
        [str(zllm), "generate", "--chat", "What is the capital of France?", "--max-tokens", "20"],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout, (result.stdout, result.stderr[-2000:])


@pytest.mark.timeout(120)
def test_zllm_chat_answers_each_turn_and_exits(tiny_checkpoints: dict[str, str]) -> None:
    zllm = Path(sys.executable).with_name("zllm")
    model = ["--model", tiny_checkpoints["qwen3"], "--distributed-executor-backend", "uni"]
    result = subprocess.run(
        [str(zllm), "chat", "--max-tokens", "3", *model],
        input="Hello!\n\nHow are you?\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # A prompt per line read up to /exit (nothing after it); an answer per non-empty line.
    turns = result.stdout.split(">>> ")[1:]
    assert len(turns) == 4, result.stdout
    assert turns[1] == turns[3] == "", "an empty line and /exit get no answer"
    assert all(t.endswith("\n") and t.strip() for t in (turns[0], turns[2])), turns


def test_openmp_waits_spin_briefly_unless_the_user_chose() -> None:
    from zllm.protocol.process import set_openmp_waits

    env: dict[str, str] = {}
    set_openmp_waits(env)
    assert env == {"GOMP_SPINCOUNT": "10000"}
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(chosen)
        set_openmp_waits(env)
        assert env == chosen
