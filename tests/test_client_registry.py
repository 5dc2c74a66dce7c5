"""engine-core's client registry: silence is timed on the clock of listening, so a daemon that
could not listen (stopped, starved) does not drop the clients it could not hear."""

from __future__ import annotations

import time

from zllm.core.client_registry import STALL_S, ClientRegistry


def test_a_silent_client_expires_once_and_is_then_unknown() -> None:
    registry = ClientRegistry(timeout_s=0.2)
    registry.add(b"a", "a")
    registry.add(b"b", "b")
    gone = []
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # b talks, a is silent; checked as the input thread does
        registry.touch(b"b")
        gone += registry.expire()
        time.sleep(0.05)
    assert [identity for identity, _ in gone] == [b"a"]  # reported once
    assert not registry.touch(b"a")  # its frames are no longer its own
    assert len(registry) == 2  # until the main thread has aborted its requests
    assert registry.remove(b"a") and len(registry) == 1


def test_time_when_nobody_listened_is_not_held_against_clients() -> None:
    registry = ClientRegistry(timeout_s=0.3)
    registry.add(b"a", "a")
    registry.expire()
    time.sleep(STALL_S + 0.2)  # no check for longer than a stall: we were not listening
    assert registry.expire() == []
    time.sleep(0.2)
    assert registry.expire() == []
    time.sleep(0.2)  # silent for 0.4 s of listening now
    assert [identity for identity, _ in registry.expire()] == [b"a"]


def test_without_a_timeout_nobody_expires() -> None:
    registry = ClientRegistry(timeout_s=None)
    registry.add(b"a", "a")
    time.sleep(0.05)
    assert registry.expire() == []
