"""`SystemdNotifier` on its own, against a real datagram socket bound to a path (the daemon
test uses an abstract one): what it reads from systemd's variables, and what it sends."""

from __future__ import annotations

import os
import socket

import pytest

from zllm.core.systemd_notify import SystemdNotifier


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    yield sock, str(tmp_path / "notify")
    sock.close()


def test_a_path_socket_gets_ready_status_and_watchdog_pings(notify_socket, monkeypatch):
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier.from_environ()
    try:
        assert notifier.watchdog_interval == 1.0
        notifier.ready("serving m")
        assert sock.recv(4096).decode().splitlines() == [
            "READY=1",
            "STATUS=serving m",
            f"MAINPID={os.getpid()}",
        ]
        notifier.tick(lambda: "busy")  # the first tick pings; the status was just sent
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.tick(lambda: "busy")  # within the interval: nothing
        sock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
        notifier.stopping("draining")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    finally:
        notifier.close()


def test_the_watchdog_of_another_process_is_not_ours(notify_socket, monkeypatch):
    """systemd passes WATCHDOG_PID so that children (a worker) do not ping for the service."""
    _, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = SystemdNotifier.from_environ()
    assert notifier.enabled and notifier.watchdog_interval is None
    notifier.close()


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    notifier = SystemdNotifier.from_environ()
    assert not notifier.enabled
    notifier.ready("x")  # no socket: does nothing, raises nothing
    notifier.tick(lambda: "x")
