"""engine-core's two client sockets and the threads that own them.

    input ROUTER  (bound) <- each client's DEALER: AddRequest(s), AbortRequests, UtilityCall,
                             Goodbye, Heartbeat
    output ROUTER (bound) -> each client's DEALER: Ready, StepOutputs, UtilityReply,
                             FrameRejected, EngineDead, Disconnected
                          <- Hello (sent on the output socket so the core can route back to it)

The input thread reads the input socket; the output thread sends what every other thread
pushes to it (`inproc` PUSH/PULL) and reads the output socket. Both read frames with
`FrameReader`, answer at once what needs no engine (bad frames, refused requests, unknown
clients), note each client's liveness, and queue the rest for the main thread as
`(client, message, is_admin)`. The input thread also finds silent clients (`ClientGone`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from zllm.core.client_frames import FrameReader
from zllm.core.client_registry import ClientRegistry
from zllm.core.security import ListenError, Security, socket_file_mode
from zllm.core.server_options import ServerOptions
from zllm.protocol.messages import (
    Disconnected,
    FrameRejected,
    Heartbeat,
    Hello,
    UtilityCall,
    encode,
)
from zllm.protocol.process import ipc_listener_alive, remove_socket_file, restrict_socket_file

logger = logging.getLogger("zllm.core")

INBOX_LIMIT = 4096  # decoded frames waiting for the main thread; beyond, ZeroMQ pushes back
INPUT_YIELD_EVERY, INPUT_YIELD_S = 4, 0.0005  # see `_input_thread`
POLL_MS = 200


@dataclass
class ClientGone:
    """An inbox item from the input thread: this client was silent too long."""

    name: str
    silent_s: float


class ClientSockets:
    def __init__(
        self,
        ctx: zmq.Context,
        addresses: tuple[str, str],
        reader: FrameReader,
        clients: ClientRegistry,
        security: Security,
        options: ServerOptions,
    ) -> None:
        self.ctx = ctx
        self.addresses = addresses  # input, output
        self.reader = reader
        self.clients = clients
        self.security = security
        self.options = options
        self.inbox: queue.Queue[tuple[bytes, Any, bool]] = queue.Queue(maxsize=INBOX_LIMIT)
        self.busy = lambda: False  # set by the server: whether the engine has work
        # Every thread that answers clients pushes [client, frame] here; the output thread
        # owns the client socket and sends.
        self._outbox_address = f"inproc://outbox-{id(self)}"
        self._outbox_pull = ctx.socket(zmq.PULL)
        self._outbox_pull.bind(self._outbox_address)
        self._outbox = self._pusher()  # the main thread's
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[zmq.Socket] = []
        self.bound: list[str] = []  # addresses we bound: only those are ours to remove

    def _pusher(self) -> zmq.Socket:
        # The default high-water mark is kept: at it a PUSH blocks (it never drops) until the
        # output thread catches up, and that thread never waits for a client (its ROUTER has
        # no high-water mark), so this paces a sender behind that thread alone.
        sock = self.ctx.socket(zmq.PUSH)
        sock.connect(self._outbox_address)
        return sock

    # ---- binding (the caller's thread, before any model is loaded) -----------------------------

    def listen(self) -> None:
        """Bind both sockets, so that a taken or impossible address is an error at once."""
        mode, gid = socket_file_mode(self.options.socket_group)
        try:
            for address, is_output in zip(self.addresses, (False, True)):
                if address.startswith("ipc://") and ipc_listener_alive(address):
                    raise ListenError(
                        f"cannot listen on {address}: another engine-core is serving it "
                        "(stop it first, or choose another --address)"
                    )
                sock = self.ctx.socket(zmq.ROUTER)
                sock.setsockopt(zmq.LINGER, 1000 if is_output else 0)
                if is_output:
                    # No high-water mark: a ROUTER drops, in silence, what goes to a client
                    # whose queue is full (by default 1000 messages here and 1000 in the
                    # client: a client ~2000 steps behind never saw its requests finish), and
                    # blocking instead would stall every other client. A slow client's queue
                    # holds only its own requests' outputs; ZeroMQ frees it when the client
                    # disconnects, and a client silent for `--client-timeout` is forgotten
                    # (its requests aborted: its queue stops growing). Set before bind: each
                    # connection's pipe takes the value then.
                    sock.setsockopt(zmq.SNDHWM, 0)
                # A larger frame is a hostile peer: ZeroMQ drops its connection unread.
                sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.reader.max_frame_bytes)
                self.security.configure(sock)
                self._sockets.append(sock)
                try:
                    sock.bind(address)
                except zmq.ZMQError as e:
                    raise ListenError(f"cannot listen on {address}: {e.strerror}") from None
                self.bound.append(address)
                restrict_socket_file(address, mode, gid, self.options.private_socket_dir)
        except BaseException:
            self.close()
            raise

    # ---- threads -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start both threads; the sockets move to them here (thread start is the memory
        barrier ZeroMQ asks for)."""
        input_sock, output_sock = self._sockets
        self._threads = [
            threading.Thread(
                target=self._input_thread, args=(input_sock,), name="zllm-core-input", daemon=True
            ),
            threading.Thread(
                target=self._output_thread,
                args=(output_sock,),
                name="zllm-core-output",
                daemon=True,
            ),
        ]
        for t in self._threads:
            t.start()

    def send(self, client: bytes, message: msgspec.Struct) -> None:
        """Send to one client (from the main thread)."""
        self._outbox.send_multipart([client, encode(message)])

    def _receive(self, sock: zmq.Socket, send: Any, block: bool) -> None:
        """Read one message from a client socket: answer what needs no engine, queue the rest.

        The input thread may wait for room in the inbox (ZeroMQ then holds frames back); the
        output thread must not, as the main thread may be waiting for it to send."""
        frames = sock.recv_multipart(copy=False)
        client = frames[0].bytes
        message, replies = self.reader.read([f.bytes for f in frames])
        known = self.clients.touch(client)
        for reply in replies:
            send(reply)
        if message is None or isinstance(message, Heartbeat) and known:
            return
        if not known and not isinstance(message, Hello):
            error = (
                "engine-core does not know this client: it never said Hello, or was silent for "
                f"more than the client timeout ({self.clients.timeout_s} s) and its requests "
                "were aborted"
            )
            send([client, encode(Disconnected(error=error))])
            return
        is_admin = isinstance(message, UtilityCall) and self.security.is_admin(frames[-1])
        try:
            self.inbox.put((client, message, is_admin), block=block)
        except queue.Full:
            error = f"engine-core's inbox is full ({INBOX_LIMIT} messages): try again"
            send([client, encode(FrameRejected(error=error))])

    def _input_thread(self, sock: zmq.Socket) -> None:
        answers = self._pusher()
        frames = 0
        while not self._stopping.is_set():
            if sock.poll(POLL_MS):
                self._receive(sock, answers.send_multipart, block=True)
                frames += 1
                # The busy loop needs the GIL between its torch calls: while it has work, pause
                # now and then, so a flood of frames slows itself (ZeroMQ holds them back),
                # never the batch.
                if frames % INPUT_YIELD_EVERY == 0 and self.busy():
                    time.sleep(INPUT_YIELD_S)
            now = time.monotonic()
            for client, info in self.clients.expire():
                self.inbox.put((client, ClientGone(info.name, now - info.last_seen), False))
        answers.close(0)
        sock.close(0)

    def _output_thread(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._outbox_pull, zmq.POLLIN)
        while True:
            events = dict(poller.poll(POLL_MS))
            if self._outbox_pull in events:
                frames = self._outbox_pull.recv_multipart()
                if frames == [b"stop"]:
                    break
                self._send_now(sock, frames)
            if sock in events:
                self._receive(sock, lambda frames: self._send_now(sock, frames), block=False)
        sock.close()
        self._outbox_pull.close()

    @staticmethod
    def _send_now(sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            sock.send_multipart(frames)
        except zmq.ZMQError as e:
            logger.warning("could not send to client %s: %s", frames[0].hex(), e)

    # ---- the end -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the threads (after what the main thread sent went out), remove our socket files."""
        self._stopping.set()
        if self._threads:
            self._outbox.send_multipart([b"stop"])
            for thread in self._threads:
                thread.join(timeout=3)
        else:  # bound, never served
            for sock in self._sockets:
                sock.close(0)
            self._outbox_pull.close(0)
        self._outbox.close(0)
        for address in self.bound:
            remove_socket_file(address, self.options.private_socket_dir)
        self.bound = []
