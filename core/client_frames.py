"""Client frames as engine-core's socket threads read them.

A frame normally decodes to one typed `ClientMessage`. When it does not, the frame is read
again untyped, request by request, so that every request and call it names gets an answer
(an error) instead of silence, and the good requests beside a bad one still run. Only a
frame that names nothing is answered with `FrameRejected`, and so is a frame over the size
limit (unread). Requests that break the admission rules are refused here too, so a flood of
bad frames never reaches the busy loop; so are all requests while engine-core drains.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from zllm.protocol.admission import AdmissionLimits, describe_validation_error, request_error
from zllm.protocol.messages import (
    MAX_FRAME_BYTES,
    AddRequest,
    AddRequests,
    ClientMessage,
    FrameRejected,
    RequestUpdate,
    StepOutputs,
    UtilityReply,
    decode_client_message,
    decode_untyped,
    encode,
)


@dataclass
class Answer:
    """The errors owed for the parts of one frame that will not run."""

    updates: list[RequestUpdate] = field(default_factory=list)  # refused requests, by id
    replies: list[UtilityReply] = field(default_factory=list)  # refused calls, by call id
    frame_error: str | None = None  # the frame named nothing to answer: tell the sender this

    def messages(self) -> list[msgspec.Struct]:
        out: list[msgspec.Struct] = []
        if self.updates:
            out.append(StepOutputs(updates=self.updates, timestamp=time.time()))
        out += self.replies
        if self.frame_error is not None:
            out.append(FrameRejected(error=self.frame_error))
        return out

    def describe(self) -> str:
        errors = [u.error or "" for u in self.updates] + [r.error or "" for r in self.replies]
        return "; ".join(([self.frame_error] if self.frame_error else []) + errors)


class FrameReader:
    """Reads ROUTER messages for the socket threads (both may call it): what the main thread
    must see goes to the inbox; answers that need no engine state go straight back."""

    def __init__(self, logger: logging.Logger) -> None:
        self.limits: AdmissionLimits | None = None  # set once the engine is up
        self.max_frame_bytes = MAX_FRAME_BYTES
        # Set while engine-core drains: every request is refused with this error.
        self.refusing: str | None = None
        self.num_rejected = 0  # frames that did not decode (cumulative)
        self._lock = threading.Lock()
        self._log = RateLimitedLog(logger)

    def read(self, frames: list[bytes]) -> tuple[ClientMessage | None, list[list[bytes]]]:
        """(the message for the main thread or None, replies as [client, frame])."""
        client = frames[0]
        message: ClientMessage | None = None
        if len(frames) != 2:
            answer = Answer(frame_error=f"a message of {len(frames) - 1} parts")
        elif len(frames[1]) > self.max_frame_bytes:
            size, limit = len(frames[1]), self.max_frame_bytes
            answer = Answer(frame_error=f"a frame of {size} bytes, over the limit of {limit}")
        else:
            message, answer = read_frame(frames[1])
        if answer is not None:
            with self._lock:
                self.num_rejected += 1
            self._log.warning(
                "undecodable frame from client %s: %s", client.hex(), answer.describe()[:300]
            )
        if isinstance(message, AddRequest):
            message = AddRequests(requests=[message])
        if isinstance(message, AddRequests):
            answer = answer or Answer()
            message = self._screen(message, answer)
        replies = [[client, encode(m)] for m in answer.messages()] if answer else []
        return message, replies

    def _screen(self, adds: AddRequests, answer: Answer) -> AddRequests | None:
        """Keep the requests the admission rules allow; refuse the others in `answer`."""
        good = []
        refusing = self.refusing
        for add in adds.requests:
            if refusing is not None:
                answer.updates.append(RequestUpdate.refused(add.request_id, refusing, "shutdown"))
                continue
            if self.limits is None:  # a client must wait for Ready; ours always do
                error = "engine-core is not ready yet: wait for its Ready before sending requests"
            else:
                error = request_error(add, self.limits)
            if error is None:
                good.append(add)
            else:
                answer.updates.append(RequestUpdate.refused(add.request_id, error))
        return AddRequests(requests=good) if good else None


def read_frame(frame: bytes) -> tuple[ClientMessage | None, Answer | None]:
    """The frame's message, or what of it decodes plus the answer owed for the rest."""
    try:
        return decode_client_message(frame), None
    except msgspec.MsgspecError as e:
        error = describe_validation_error(e) if isinstance(e, msgspec.ValidationError) else str(e)
    try:
        raw = decode_untyped(frame)
    except msgspec.MsgspecError:
        return None, Answer(frame_error=f"the frame is not msgpack: {error}")
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "AddRequest":
        return _salvage_adds([raw])
    if kind == "AddRequests" and isinstance(raw.get("requests"), list):
        return _salvage_adds(raw["requests"])
    if kind == "UtilityCall" and _is_int(raw.get("call_id")):
        return None, Answer(replies=[UtilityReply(call_id=raw["call_id"], error=error)])
    return None, Answer(frame_error=f"a {kind or 'untyped'} frame did not decode: {error}")


def _salvage_adds(items: list[Any]) -> tuple[AddRequests | None, Answer]:
    good: list[AddRequest] = []
    answer = Answer()
    unnamed = 0
    for item in items:
        try:
            good.append(msgspec.convert(item, AddRequest))
            continue
        except msgspec.ValidationError as e:
            error = describe_validation_error(e)
        request_id = item.get("request_id") if isinstance(item, dict) else None
        if isinstance(request_id, str):
            answer.updates.append(RequestUpdate.refused(request_id, error))
        else:
            unnamed += 1
    if unnamed:
        answer.frame_error = f"{unnamed} request(s) without a string request_id did not decode"
    return (AddRequests(requests=good) if good else None), answer


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RateLimitedLog:
    """At most `burst` log lines per `interval` seconds; the rest are counted and summed up.
    Called from two threads: a line more or less is of no consequence, so no lock."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, burst: int = 5) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.window_start = -interval
        self.logged = 0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.window_start >= self.interval:
            if self.suppressed:
                self.logger.warning(
                    "... and %d more like it in the last %.0f s", self.suppressed, self.interval
                )
            self.window_start, self.logged, self.suppressed = now, 0, 0
        if self.logged < self.burst:
            self.logged += 1
            self.logger.warning(message, *args)
        else:
            self.suppressed += 1
