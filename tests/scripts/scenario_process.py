"""Run a scenario script in its own process with a hard timeout, so a hang fails a test
instead of blocking the suite. Start several at once, collect each in its own test."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SCRIPTS = Path(__file__).parent


@contextlib.contextmanager
def single_threaded_engines() -> Iterator[None]:
    """Engine processes spawned inside run torch on one thread: on a shared 2-core machine a
    tiny model's step is ~10x faster than with competing OpenMP threads."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old


def tiny_async_engine(path: str):
    """An `AsyncLLM` on a tiny checkpoint: worker in-process, small KV pool, one torch thread."""
    from zllm import AsyncLLM, EngineArgs

    with single_threaded_engines():
        return AsyncLLM(
            EngineArgs(model=path, distributed_executor_backend="uni", kv_cache_memory_bytes=2**24)
        )


class ScenarioProcess:
    def __init__(self, script: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.name = " ".join([script, *args[:1]])
        self.env = env = dict(
            os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **(env or {})
        )
        # stderr to a file: engine processes inherit it and must never block on a full pipe
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / script), *args],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        self._result: tuple[int, str, str] | None = None

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """(exit code, stdout, stderr); a process still running after `timeout` is killed and
        the test fails with its output so far."""
        if self._result is None:
            try:
                out, _ = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
                err = self._read_stderr()
                raise AssertionError(
                    f"{self.name} hung (> {timeout:.0f}s)\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
                ) from None
            self._result = (self.proc.returncode, out, self._read_stderr())
        return self._result

    def _read_stderr(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def result(self, timeout: float) -> dict:
        """The scenario's last JSON line with an "ok" key; fails with its output otherwise."""
        code, out, err = self.finish(timeout)
        for line in reversed(out.splitlines()):
            if line.startswith("{") and '"ok"' in line:
                return json.loads(line)
        raise AssertionError(
            f"{self.name} failed (exit {code})\nstdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}"
        )

    def read_json_line(self, timeout: float) -> dict:
        """The next JSON line the scenario prints, waiting at most `timeout`."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = self.proc.stdout.readline()
                    if not line:
                        break  # it exited
                    if line.startswith("{"):
                        return json.loads(line)
        self.kill()
        raise AssertionError(f"{self.name} printed no JSON line in {timeout:.0f}s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
