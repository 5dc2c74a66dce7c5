"""Errors the client raises to its callers."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine (engine-core or a worker) is gone; no request can complete.

    The message carries the root cause when one is known.
    """


class EngineStartupError(RuntimeError):
    """The engine could not start; the message is the failing process's own error."""


class EngineOverloadedError(RuntimeError):
    """The engine refused a request because its queue is full (`max_queued_requests`); the
    request was not started and may be retried later."""
