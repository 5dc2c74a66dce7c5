"""Conventions every zllm child process follows: die with its parent, private IPC paths."""

from __future__ import annotations

import ctypes
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


PDEATHSIG_ENV = "ZLLM_PDEATHSIG"
PARENT_PID_ENV = "ZLLM_PARENT_PID"


def spawn_env() -> dict[str, str]:
    """The environment for a child that should die with us.

    The kernel's parent-death signal fires when the *thread* that spawned the child exits,
    not the process: a child spawned from a short-lived thread (an engine built inside
    `asyncio.to_thread`) would be killed with it. Such children rely on the watcher alone.
    """
    env = dict(os.environ)
    env[PDEATHSIG_ENV] = "1" if threading.current_thread() is threading.main_thread() else "0"
    env[PARENT_PID_ENV] = str(os.getpid())
    # OpenMP's default busy-waiting turns a shared CPU into a 10x slowdown for every process
    # on it (seen with 2 cores); sleeping waits cost little when the cores are ours alone.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def die_with_parent(
    on_parent_exit: Callable[[], None] | None = None, interval: float = 0.2
) -> None:
    """Exit when the process that started us is gone (SIGKILLed frontends leave no orphans).

    The kernel's parent-death signal covers most cases, even a process stuck in native code;
    a watcher thread covers the race where the parent died before we set it, children spawned
    from a non-main thread (see `spawn_env`), and lets the caller clean up first.
    """
    # The spawner's pid, not getppid(): the parent may already be gone by now.
    parent = int(os.environ.pop(PARENT_PID_ENV, 0) or os.getppid())
    if os.environ.pop(PDEATHSIG_ENV, "1") != "0":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                if on_parent_exit is not None:
                    try:
                        on_parent_exit()
                    finally:
                        os._exit(1)
                os._exit(1)
            time.sleep(interval)

    threading.Thread(target=watch, name="zllm-parent-watch", daemon=True).start()


def private_ipc_address(role: str) -> tuple[str, str]:
    """An `ipc://` address in a fresh mode-0700 directory (so the socket is ours alone), and that directory."""
    directory = tempfile.mkdtemp(prefix="zllm-")
    os.chmod(directory, 0o700)
    return f"ipc://{directory}/{role}-{uuid.uuid4().hex[:8]}.sock", directory


def restrict_socket_file(address: str) -> None:
    """chmod 0600 the file behind a bound `ipc://` address."""
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        if os.path.exists(path):
            os.chmod(path, 0o600)


def remove_socket_file(address: str) -> None:
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        for p in (path, os.path.dirname(path)):
            try:
                os.remove(p) if p == path else os.rmdir(p)
            except OSError:
                pass


def core_addresses(base: str) -> tuple[str, str]:
    """The input and output socket addresses of an engine-core listening at `base`.

    `ipc:///run/zllm/core` -> `.../core.in`, `.../core.out`; `tcp://host:port` -> port, port + 1.
    """
    if base.startswith("tcp://"):
        host, port = base[len("tcp://") :].rsplit(":", 1)
        return f"tcp://{host}:{port}", f"tcp://{host}:{int(port) + 1}"
    return f"{base}.in", f"{base}.out"


def describe_exit(pid: int, returncode: int) -> str:
    """How a child ended, for error messages: "(pid N) was killed by SIGKILL" / "exited with code 1"."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"(pid {pid}) was killed by {name}"
    return f"(pid {pid}) exited with code {returncode}"
