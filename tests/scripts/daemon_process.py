"""A `zllm engine-core` daemon for tests: a real subprocess on a tiny checkpoint (the worker
in-process unless asked otherwise), its log in a file, stopped and checked at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

TINY = ["--kv-cache-memory-bytes", str(2**24)]


def free_port() -> int:
    """A port p with p + 1 free as well (a daemon listens on both)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free ports")


class Daemon:
    def __init__(
        self,
        model: str,
        address: str,
        *options: str,
        backend: str = "uni",
        env: dict[str, str] | None = None,
    ) -> None:
        self.address = address
        self.log = tempfile.NamedTemporaryFile("w+", prefix="zllm-daemon-", suffix=".log")
        command = [sys.executable, "-m", "zllm.frontend.cli", "engine-core", "--address", address]
        command += [model, "--distributed-executor-backend", backend, *TINY, *options]
        self.proc = subprocess.Popen(
            command,
            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"the daemon exited:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code (SIGKILL after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
