"""`zllm serve` as a subprocess on a free port, for tests: started, waited for (its /health),
stopped with SIGTERM (its exit code is the test's business), always killed at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # stderr to a file: engine processes inherit it and must never block on a full pipe
        self.log = tempfile.NamedTemporaryFile("w+", prefix="zllm-serve-", suffix=".log")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zllm.frontend.cli", "serve", *args, "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"zllm serve exited ({self.proc.returncode}):\n{self.output()}")
            if self.health() == 200:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"zllm serve not ready after {timeout} s:\n{self.output()}")

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def engine_core_pid(self) -> int:
        children = psutil.Process(self.proc.pid).children(recursive=True)
        return next(p.pid for p in children if "zllm.core.main" in " ".join(p.cmdline()))

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-4000:]

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then its exit code (killed, and a failure, if it does not stop in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """The server and everything it started, whatever state they are in."""
        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
        except psutil.NoSuchProcess:
            family = []
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(30)
        self.log.close()


@contextlib.contextmanager
def running_server(*args: str, env: dict[str, str] | None = None):
    """A ready server for a `with` block (a module fixture), killed with all it started."""
    proc = ServerProcess(*args, env=env)
    try:
        yield proc.wait_ready()
    finally:
        proc.kill()
