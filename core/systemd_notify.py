"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram per message to
`$NOTIFY_SOCKET` (a path, or an abstract socket when it starts with "@"), no libsystemd.

engine-core says `EXTEND_TIMEOUT_USEC` while it loads (so `TimeoutStartSec` need not cover
the largest model), `READY=1` once the model is loaded and warmed up, `STATUS=` lines,
`WATCHDOG=1` from its busy loop at half of `$WATCHDOG_USEC` (a wedged loop stops pinging
and systemd restarts the service), and `STOPPING=1` when it starts to drain. Without
`$NOTIFY_SOCKET` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

logger = logging.getLogger("zllm.core")

EXTEND_EVERY_S = 10.0  # while loading: ask for this much more time, twice over, this often
STATUS_EVERY_S = 2.0


class SystemdNotifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # the loading keep-alive thread sends too
        self._last_ping = 0.0
        self._last_status = 0.0
        self._failed = False
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._target = "\0" + address[1:] if address.startswith("@") else address

    @classmethod
    def from_environ(cls) -> SystemdNotifier:
        """From systemd's variables; the watchdog only if it watches this very process."""
        address = os.environ.get("NOTIFY_SOCKET") or None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        return cls(address, int(usec) if watched else None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            with self._lock:
                self._sock.sendto("\n".join(lines).encode(), self._target)
        except OSError as e:
            if not self._failed:  # systemd is gone or the socket is wrong: say so once
                self._failed = True
                logger.warning("cannot notify systemd at %s: %s", self.address, e)

    # ---- start-up ----------------------------------------------------------------------------

    def keep_extending(self, until: threading.Event, limit_s: float) -> threading.Thread | None:
        """While `until` is unset (the model loads), ask for more start-up time every
        `EXTEND_EVERY_S`, for at most `limit_s` in all: a load that hangs still times out."""
        if self._sock is None:
            return None

        def run() -> None:
            deadline = time.monotonic() + limit_s
            while not until.is_set() and time.monotonic() < deadline:
                self.send(f"EXTEND_TIMEOUT_USEC={int(2 * EXTEND_EVERY_S * 1e6)}")
                until.wait(EXTEND_EVERY_S)

        thread = threading.Thread(target=run, name="zllm-systemd-extend", daemon=True)
        thread.start()
        return thread

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        self._last_status = time.monotonic()

    # ---- the busy loop ---------------------------------------------------------------------------

    def tick(self, status) -> None:
        """Called by the busy loop every iteration: `WATCHDOG=1` when half the watchdog
        interval passed since the last, a `STATUS=` line (`status()`) every few seconds."""
        if self._sock is None:
            return
        now = time.monotonic()
        if self.watchdog_interval is not None and now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.send("WATCHDOG=1")
        if now - self._last_status >= STATUS_EVERY_S:
            self._last_status = now
            self.send(f"STATUS={status()}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
