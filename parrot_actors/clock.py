"""The process's one clock: real monotonic time, or the simulated time of a `SimEventLoop`.

Everything that times or schedules work (engine requests, the scheduler's queue waits and
starvation bound, per-call stats, session and retention deadlines, the scenario clients)
reads `now()`, so a simulated run (`parrot_actors.simtime`) moves every one of them together:
the runtime, the scheduler, the engines, the server and the clients see one timeline. Outside a
simulated run `now()` is `time.monotonic()` (seconds, nanosecond resolution on Linux), in
every thread, so values taken on different event loops of one process compare.
"""

from __future__ import annotations

import time
from typing import Protocol


class _Clock(Protocol):
    def time(self) -> float: ...


_simulated: _Clock | None = None


def now() -> float:
    """Seconds on the process clock: the simulated loop's time while one runs (see
    `parrot_actors.simtime`), else `time.monotonic()`. Only differences are meaningful."""
    sim = _simulated
    return sim.time() if sim is not None else time.monotonic()


def simulated() -> bool:
    """True while a simulated event loop drives the process clock."""
    return _simulated is not None


def _install(clock: _Clock | None) -> _Clock | None:
    """Make `clock` the process clock (None: real time again); returns the previous one.
    Used by `simtime.run` only."""
    global _simulated
    previous, _simulated = _simulated, clock
    return previous
