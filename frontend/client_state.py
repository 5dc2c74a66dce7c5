"""The one lifecycle state of an `EngineClient`, and the transitions it may make.

    STARTING ──Ready──► RUNNING ──engine died (a core we spawned)───────────► DEAD
        │                 │  ▲                                                 ▲
        │  connection to  │  │ Ready again (same model)                        │ the daemon came
        │  a daemon lost  ▼  │                                                 │ back with another
        │            RECONNECTING ─────────────────────────────────────────────┘ model
        │
        └─ start-up failed ─► CLOSED
    any state but CLOSING/CLOSED ── shutdown() ──► CLOSING ── resources released ──► CLOSED

Only RUNNING accepts requests at once; RECONNECTING accepts them and holds them until the
daemon answers again (or fails them, see `EngineClient`). DEAD, CLOSING and CLOSED refuse
every call with `error`. Transitions not drawn here are refused (`advance` returns False):
a late "engine died" after `shutdown()`, a second shutdown, a Ready after death.
"""

from __future__ import annotations

import enum
import threading

from zllm.frontend.errors import EngineDeadError


class ClientState(enum.Enum):
    STARTING = "starting"  # sockets open, waiting for the engine's Ready
    RUNNING = "running"  # connected; requests flow
    RECONNECTING = "reconnecting"  # a daemon's connection broke; new sockets wait for its Ready
    DEAD = "dead"  # the engine is gone for good: every call raises `error`
    CLOSING = "closing"  # shutdown() in progress
    CLOSED = "closed"  # sockets, process and I/O thread released


_ALLOWED: dict[ClientState, frozenset[ClientState]] = {
    ClientState.STARTING: frozenset(
        {ClientState.RUNNING, ClientState.DEAD, ClientState.CLOSING, ClientState.CLOSED}
    ),
    ClientState.RUNNING: frozenset(
        {ClientState.RECONNECTING, ClientState.DEAD, ClientState.CLOSING}
    ),
    ClientState.RECONNECTING: frozenset(
        {ClientState.RUNNING, ClientState.DEAD, ClientState.CLOSING}
    ),
    ClientState.DEAD: frozenset({ClientState.CLOSING}),
    ClientState.CLOSING: frozenset({ClientState.CLOSED}),
    ClientState.CLOSED: frozenset(),
}

SHUT_DOWN = "the engine was shut down"


class Lifecycle:
    """The state, the error that goes with it, and an event set once CLOSED."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = ClientState.STARTING
        self.error: EngineDeadError | None = None  # why calls fail (DEAD and after)
        self.closed = threading.Event()

    def advance(self, new: ClientState, error: str | None = None) -> bool:
        """Move to `new` if the diagram allows it from here; False (and no change) otherwise.
        Entering DEAD or CLOSING sets `error` unless an earlier one stands."""
        with self._lock:
            if new not in _ALLOWED[self.state]:
                return False
            self.state = new
            if new in (ClientState.DEAD, ClientState.CLOSING) and self.error is None:
                self.error = EngineDeadError(error or SHUT_DOWN)
        if new is ClientState.CLOSED:
            self.closed.set()
        return True

    @property
    def accepts_requests(self) -> bool:
        return self.state in (ClientState.RUNNING, ClientState.RECONNECTING)

    @property
    def finished(self) -> bool:
        """DEAD, CLOSING or CLOSED: no call can succeed any more."""
        return self.state in (ClientState.DEAD, ClientState.CLOSING, ClientState.CLOSED)

    def check(self) -> None:
        """Raise the error every call gets once no request can complete."""
        state = self.state
        if state in (ClientState.DEAD, ClientState.CLOSING, ClientState.CLOSED):
            raise EngineDeadError(str(self.error or SHUT_DOWN))
        if state is ClientState.STARTING:
            raise EngineDeadError("the engine has not started yet")
