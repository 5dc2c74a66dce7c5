"""A hand-driven client of engine-core: the two DEALER sockets a real client has, sending any
frame at all (well-formed or not) and reading what the core answers."""

from __future__ import annotations

import uuid

import zmq

from zllm.protocol import messages as m


class RawClient:
    def __init__(self, input_address: str, output_address: str, hello: bool = True) -> None:
        self.ctx = zmq.Context()
        identity = uuid.uuid4().bytes
        self.to_core, self.from_core = (
            self._connect(a, identity) for a in (input_address, output_address)
        )
        if hello:
            self.from_core.send(m.encode(m.Hello(protocol_version=m.PROTOCOL_VERSION)))
            assert isinstance(self.recv(60), m.Ready)

    def _connect(self, address: str, identity: bytes) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        return sock

    def send(self, frame: bytes | m.ClientMessage) -> None:
        self.to_core.send(frame if isinstance(frame, bytes) else m.encode(frame))

    def recv(self, timeout_s: float) -> m.CoreMessage:
        assert self.from_core.poll(int(timeout_s * 1000)), "engine-core did not answer"
        return m.decode_core_message(self.from_core.recv())

    def updates_until_finished(self, request_ids: set[str], timeout_s: float) -> dict[str, list]:
        """Every update for these requests until each has finished (or was refused)."""
        got: dict[str, list] = {rid: [] for rid in request_ids}
        pending = set(request_ids)
        while pending:
            message = self.recv(timeout_s)
            if isinstance(message, m.StepOutputs):
                for update in message.updates:
                    got[update.request_id].append(update)
                    if update.finish_reason is not None:
                        pending.discard(update.request_id)
        return got

    def close(self) -> None:
        self.send(m.Goodbye())
        self.to_core.close(0)
        self.from_core.close(0)
        self.ctx.term()
