"""Who may connect to engine-core, and who may change it for everyone.

- **Where it listens**: ipc socket files are 0600 (0660 with `--socket-group`); TCP binds
  a loopback address unless CurveZMQ is on, or `--insecure` says otherwise.
- **CurveZMQ**: the client sockets are Curve servers with this daemon's key pair; a ZAP
  handler (pyzmq's authenticator thread) lets in only the public keys found in the
  `--curve-clients` and `--curve-admins` directories (`zllm keys generate` writes them).
- **Roles**: utility calls that affect every client (`ADMIN_METHODS`) need the admin role:
  an ipc peer running as this daemon's uid (or root), or a client whose Curve key is in
  `--curve-admins`. ZeroMQ tells each frame's origin (`Peer-Address` carries an ipc peer's
  uid, `User-Id` the Curve key the ZAP handler accepted), so the role is checked per call.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import os
import socket
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from zllm.core.client_frames import RateLimitedLog
from zllm.core.server_options import ServerOptions

logger = logging.getLogger("zllm.core")

# Utility calls only an admin may make: they change the engine for every client.
ADMIN_METHODS = frozenset({"sleep", "wake_up", "reset_prefix_cache", "shutdown", "collective_rpc"})


class ListenError(RuntimeError):
    """engine-core cannot (or must not) listen on its address."""


def check_address(address: str, options: ServerOptions) -> None:
    """Refuse a non-loopback TCP address without Curve (unless `--insecure`)."""
    if not address.startswith("tcp://") or options.curve or options.insecure:
        return
    host = address[len("tcp://") :].rpartition(":")[0].strip("[]")
    if not is_loopback(host):
        raise ListenError(
            f"{address} is reachable from other hosts, and nothing would authenticate its "
            "clients (anyone reaching the port could run requests, or put the engine to "
            "sleep): give --curve-secret-key and --curve-clients (keys from `zllm keys "
            "generate`), listen on 127.0.0.1, or pass --insecure"
        )


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address ("*" and 0.0.0.0 are not)."""
    if host in ("*", ""):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def socket_file_mode(group: str | None) -> tuple[int, int | None]:
    """(mode, gid) for ipc socket files: ours alone, or shared with a group."""
    if group is None:
        return 0o600, None
    try:
        return 0o660, grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenError(f"--socket-group {group!r}: no such group") from None


class Security:
    """Curve for the client sockets (when configured) and the admin check."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.admin_uids = {os.getuid(), 0}
        self.auth: ThreadAuthenticator | None = None
        self._server_keys: tuple[bytes, bytes] | None = None
        self._allowed: set[bytes] = set()  # z85 public keys
        self._admins: set[str] = set()
        self._refusals = RateLimitedLog(logger)  # a stranger retrying must not flood the log
        if options.curve:
            if not zmq.has("curve"):
                raise ListenError("this build of ZeroMQ has no CurveZMQ support")
            public, secret = _load_key(options.curve_secret_key, secret=True)
            self._server_keys = (public, secret)
            admins = _load_key_dir(options.curve_admins, "--curve-admins")
            self._allowed = admins | _load_key_dir(options.curve_clients, "--curve-clients")
            self._admins = {key.decode() for key in admins}

    def start(self, ctx: zmq.Context) -> None:
        """Start the ZAP handler (before any Curve socket binds)."""
        if self._server_keys is None:
            return
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("zllm.core.zap"))
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """The ZAP handler asks: may this client key connect?"""
        allowed = key in self._allowed
        if not allowed:
            self._refusals.warning("refused a client with an unlisted Curve key %s", key.decode())
        return allowed

    def configure(self, sock: zmq.Socket) -> None:
        """Make a client socket a Curve server (before it binds)."""
        if self._server_keys is not None:
            sock.curve_publickey, sock.curve_secretkey = self._server_keys
            sock.curve_server = True

    def is_admin(self, frame: zmq.Frame) -> bool:
        """Whether the peer that sent this frame has the admin role."""
        if self._admins and _property(frame, "User-Id") in self._admins:
            return True
        peer = _property(frame, "Peer-Address") or ""  # ipc: "localhost:UID:GID:PID"
        parts = peer.split(":")
        return len(parts) == 4 and parts[1].isdigit() and int(parts[1]) in self.admin_uids

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


def _property(frame: zmq.Frame, name: str) -> str | None:
    try:
        return frame.get(name)
    except zmq.ZMQError:  # not set on this connection
        return None


def _load_key(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(os.path.expanduser(path))
    except (OSError, ValueError) as e:
        raise ListenError(f"cannot read the Curve key file {path}: {e}") from None
    if secret and secret_key is None:
        raise ListenError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key


def _load_key_dir(path: str | None, option: str) -> set[bytes]:
    if path is None:
        return set()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ListenError(f"{option} {path}: not a directory")
    return set(zmq.auth.load_certificates(folder))
