"""How engine-core serves its clients: the `zllm engine-core` options that are not engine
options. A core spawned by one frontend uses `ServerOptions.spawned()`: it dies with that
frontend, so it neither times clients out nor drains."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerOptions:
    # A client silent this long (no frame, no heartbeat) is forgotten: its requests are
    # aborted and their KV blocks freed. None: never.
    client_timeout: float | None = 5.0
    # SIGTERM: stop admitting, let running requests finish for this long, abort the rest.
    drain_timeout: float = 30.0
    socket_group: str | None = None  # ipc socket files 0660 for this group (else 0600)
    # CurveZMQ: this daemon's secret key file, and directories of the public keys allowed
    # to connect (`curve_clients`) and of those that also get the admin role (`curve_admins`).
    curve_secret_key: str | None = None
    curve_clients: str | None = None
    curve_admins: str | None = None
    insecure: bool = False  # allow a non-loopback TCP address without Curve
    warm_up: bool = True  # run one request through the engine before reporting ready
    # The sockets are in a directory made for this core alone (`private_ipc_address`),
    # removed with them; a daemon's directory is its operator's and stays.
    private_socket_dir: bool = False

    def __post_init__(self) -> None:
        if self.client_timeout is not None and not self.client_timeout > 0:
            raise ValueError(f"--client-timeout must be > 0 seconds, got {self.client_timeout}")
        if not self.drain_timeout >= 0:
            raise ValueError(f"--drain-timeout must be >= 0 seconds, got {self.drain_timeout}")
        key_dirs = self.curve_clients is not None or self.curve_admins is not None
        if (self.curve_secret_key is None) == key_dirs:
            raise ValueError(
                "CurveZMQ needs both --curve-secret-key (this daemon's key) and "
                "--curve-clients and/or --curve-admins (the public keys allowed to connect)"
            )
        if self.insecure and self.curve:
            raise ValueError("--insecure contradicts --curve-secret-key: choose one")

    @property
    def curve(self) -> bool:
        return self.curve_secret_key is not None

    @classmethod
    def spawned(cls) -> ServerOptions:
        return cls(client_timeout=None, drain_timeout=0.0, warm_up=False, private_socket_dir=True)
