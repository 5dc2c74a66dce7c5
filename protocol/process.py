"""Conventions every zllm child process follows: die with its parent, private IPC paths."""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import MutableMapping

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
    set_openmp_waits(env)
    return env


def set_openmp_waits(env: MutableMapping[str, str]) -> None:
    """How OpenMP's threads wait between the ops of a step, unless the user said.

    A short spin before sleeping: waking sleeping threads for each of a CPU step's hundreds of
    ops slows the worker (`OMP_WAIT_POLICY=PASSIVE` lost every pair of runs of the CPU tiny
    benchmark, by 2-30%: bench/RESULTS.md), while OpenMP's default spin (30x longer) takes
    the cores from every other process on a small machine (a 10x slowdown seen with 2 cores).
    """
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", "10000")


def freeze_startup_heap() -> int:
    """Move every object alive now (a worker's torch and model: ~200k objects) into the
    collector's permanent generation, once start-up is done (vLLM's `freeze_gc_heap`): the
    full collections that thousands of queued requests set off then scan those requests,
    not the whole heap each time. Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)  # at exit, collected as usual (native extensions check)
    return gc.get_freeze_count()


def die_with_parent(interval: float = 0.2) -> None:
    """Exit when the process that started us is gone (SIGKILLed frontends leave no orphans).

    The kernel's parent-death signal covers most cases, even a process stuck in native code;
    a watcher thread covers the race where the parent died before we set it, children spawned
    from a non-main thread (see `spawn_env`), and removes the socket files we bound.
    """
    # The spawner's pid, not getppid(): the parent may already be gone by now.
    parent = int(os.environ.pop(PARENT_PID_ENV, 0) or os.getppid())
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # exit through atexit (socket files)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if os.environ.pop(PDEATHSIG_ENV, "1") != "0":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        remove_owned_socket_files()  # os._exit skips atexit
        os._exit(1)

    threading.Thread(target=watch, name="zllm-parent-watch", daemon=True).start()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def private_ipc_address(role: str) -> tuple[str, str]:
    """An `ipc://` address in a fresh mode-0700 directory (so the socket is ours alone), and that directory."""
    directory = tempfile.mkdtemp(prefix="zllm-")
    os.chmod(directory, 0o700)
    return f"ipc://{directory}/{role}-{uuid.uuid4().hex[:8]}.sock", directory


# ipc paths this process removes on any exit -> whether their directory goes too
_owned_socket_files: dict[str, bool] = {}


def restrict_socket_file(
    address: str, mode: int = 0o600, gid: int | None = None, private_dir: bool = True
) -> None:
    """chmod the file behind an `ipc://` address we just bound (0600: ours alone; a daemon may
    share it with a group), and remember to remove it (`remove_socket_file`)."""
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        if os.path.exists(path):
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, mode)
            remove_at_exit(address, private_dir)


def remove_at_exit(address: str, private_dir: bool = True) -> None:
    """Remove this socket file when we exit, however we exit (but SIGKILL): for the files we
    bound, and for our parent's private ones, which it cannot remove if it is SIGKILLed."""
    _owned_socket_files[address] = private_dir


def remove_socket_file(address: str, private_dir: bool = True) -> None:
    """Remove an `ipc://` socket file, and its directory if that is private (made by
    `private_ipc_address`) and now empty. A daemon's socket lives in a directory its operator
    chose, which must still be there for the next daemon to bind."""
    _owned_socket_files.pop(address, None)
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        for p in (path, os.path.dirname(path)) if private_dir else (path,):
            try:
                os.remove(p) if p == path else os.rmdir(p)
            except OSError:
                pass


def remove_owned_socket_files() -> None:
    for address, private_dir in list(_owned_socket_files.items()):
        remove_socket_file(address, private_dir)


atexit.register(remove_owned_socket_files)


def core_addresses(base: str) -> tuple[str, str]:
    """The input and output socket addresses of an engine-core listening at `base`.

    `ipc:///run/zllm/core` -> `.../core.in`, `.../core.out`; `tcp://host:port` -> port, port + 1.
    Raises `ValueError` for anything else, naming what is wrong.
    """
    if base.startswith("tcp://"):
        host, sep, port_text = base[len("tcp://") :].rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ValueError(f"a tcp address is tcp://HOST:PORT, got {base!r}")
        port = int(port_text)
        if not 1 <= port <= 65534:
            raise ValueError(
                f"port {port} in {base!r} is out of range: engine-core listens on PORT and "
                "PORT+1, so PORT must be in [1, 65534]"
            )
        return f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}"
    if base.startswith("ipc://") and len(base) > len("ipc://"):
        return f"{base}.in", f"{base}.out"
    raise ValueError(f"an engine-core address is ipc:///path/name or tcp://host:port, got {base!r}")


def listener_error(address: str) -> str | None:
    """Why nothing can be listening at a daemon's socket address, or None if something may be.

    A refused connection is certain; a silent host is not (it may be slow), so only the
    former is an error here.
    """
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        if not os.path.exists(path):
            return f"the socket file {path} does not exist"
        if not ipc_listener_alive(address):
            return f"the socket file {path} is stale: nothing accepts connections on it"
        return None
    host, _, port = address[len("tcp://") :].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()
    except ConnectionRefusedError:
        return f"{host}:{port} refused the connection"
    except OSError:
        return None  # unreachable or slow: the handshake's own timeout decides
    return None


def ipc_listener_alive(address: str) -> bool:
    """Whether some process accepts connections on this `ipc://` socket file right now.

    Binding an ipc path silently replaces the file, stealing it from a live daemon; a stale
    file (its daemon is gone) refuses connections and may be replaced.
    """
    path = address[len("ipc://") :]
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def describe_exit(pid: int, returncode: int) -> str:
    """How a child ended, for error messages: "(pid N) was killed by SIGKILL" / "exited with code 1"."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"(pid {pid}) was killed by {name}"
    return f"(pid {pid}) exited with code {returncode}"


_PROC_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "in uninterruptible sleep (stuck in the kernel or a driver?)",
    "T": "stopped (SIGSTOP?)",
    "t": "stopped by a debugger",
    "Z": "a zombie (exited)",
}


def process_state(pid: int) -> str:
    """A process's scheduler state in words, from /proc (Linux), for error messages."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "in an unknown state"
    return _PROC_STATES.get(state, f"in state {state!r}")
