"""Simulated time: an asyncio event loop whose clock jumps to the next timer when it is idle.

`run(main())` runs a coroutine like `asyncio.run`, on a `SimEventLoop`, with that loop's clock
installed as the process clock (`parrot_actors.clock.now`). Every `asyncio.sleep`, timeout and
`call_later` of everything on the loop (the runtime, the scheduler, simulated engines whose steps
sleep their predicted duration, the HTTP server, the clients, the simulated network) then takes
no wall time: whenever nothing is ready to run, no socket is readable and no worker thread is
busy, the clock moves to the earliest timer. A workload of hundreds of simulated seconds runs in
the wall time its Python code takes.

Why our own loop and not `looptime` (the library the issue names): looptime advances time after
a number of idle loop cycles while I/O or threads may still be in flight, a real-time heuristic;
here time never moves while a worker thread runs (`run_in_executor` is counted) or a socket has
data, so a run is deterministic: the same workload gives the same timings. Loopback TCP delivers
a send into the peer's receive queue within the send call on Linux, so the in-process HTTP
between the scenario clients and the server is seen by the non-blocking poll that precedes every
jump.

Host-side work (our scheduler, runtime, server, clients) is handled one of two ways, chosen per
run. By default (`charge_host=False`) it takes zero simulated time: figures are the engines'
predicted step times, the simulated network and the policies' waits, deterministic, and the
work is measured, not hidden: `SimEventLoop.host_busy_s` is the wall time the loop spent
running callbacks, reported beside simulated figures (`scenarios` prints it per mode). With
`charge_host=True` the clock also advances by the wall time of every stretch of callbacks, so
host work counts as it would in a real run, overlapping with the steps in flight (a step's
timer that is already due when the work ends fires at once). That is what stands in for a real
engine on this same CPU (`--sim cpu-fitted`), where host work is a large share of each call;
timings then vary from run to run like real ones.
Source of the technique: discrete-event simulation's next-event time advance (e.g. Law,
"Simulation Modeling and Analysis", ch. 1); Vidur (Agrawal et al., MLSys 2024) simulates
serving the same way with its own event queue, where we keep the real asyncio code.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

from parrot_actors import clock

T = TypeVar("T")

REAL_WAIT_S = 1.0
"""Longest real wait of one poll while a worker thread runs or nothing is scheduled (seconds);
the loop polls again after it (time does not move meanwhile)."""


class _SimSelector(selectors.DefaultSelector):
    """The platform selector with a time jump instead of a wait (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: SimEventLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self.loop
        if loop is None:
            return super().select(timeout)
        loop._account_busy()
        try:
            events = super().select(0)
            if events or timeout == 0:
                return events
            if loop._in_executor or timeout is None:
                # A thread's result, or a socket's data, is still to come: wait for it in
                # real time, without moving the simulated clock.
                return super().select(REAL_WAIT_S)
            loop._advance()
            return []
        finally:
            loop._busy_since = time.perf_counter()


class SimEventLoop(asyncio.SelectorEventLoop):
    """A selector event loop on simulated time (seconds from `start`).

    Attributes: `host_busy_s` (wall seconds spent running callbacks: our own host-side work),
    `jumps` (times the clock moved to a timer), `charge_host` (whether host work advances the
    clock; see the module docstring). Runs sockets and executors like any loop; only `time()`
    and the idle wait differ.
    """

    def __init__(self, start: float = 0.0, charge_host: bool = False) -> None:
        selector = _SimSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = float(start)
        self._in_executor = 0
        self.host_busy_s = 0.0
        self.charge_host = charge_host
        self.jumps = 0
        self._busy_since = time.perf_counter()

    def time(self) -> float:
        """Simulated seconds (moves only when the loop is idle)."""
        return self._now

    def run_in_executor(  # type: ignore[override]  # typeshed's variadic generics, same call
        self, executor: Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """As asyncio's, counting the call as in flight until it returns, so the clock does
        not move while a thread works (its work takes no simulated time)."""
        fut = super().run_in_executor(executor, func, *args)
        self._in_executor += 1
        fut.add_done_callback(self._executor_done)
        return fut

    async def getaddrinfo(
        self, host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        """`socket.getaddrinfo` on the loop's thread instead of the default executor: clients'
        connections then open in the order they were asked for, not in the order worker threads
        happen to finish, so runs with many concurrent connections stay deterministic. The
        simulated runs resolve loopback addresses only, which takes microseconds."""
        return socket.getaddrinfo(host, port, family, type, proto, flags)

    def _executor_done(self, _: object) -> None:
        self._in_executor -= 1

    def _account_busy(self) -> None:
        busy = time.perf_counter() - self._busy_since
        self.host_busy_s += busy
        if self.charge_host:
            self._now += busy

    def _advance(self) -> None:
        # asyncio's _run_once dropped cancelled timers from the head of the heap before
        # polling, so the head is the next timer that will fire.
        scheduled: list[asyncio.TimerHandle] = self._scheduled  # type: ignore[attr-defined]
        if scheduled:
            self._now = max(self._now, scheduled[0].when())
            self.jumps += 1


def new_event_loop(start: float = 0.0, charge_host: bool = False) -> SimEventLoop:
    """A fresh `SimEventLoop` (not installed as the process clock: `run` does that)."""
    return SimEventLoop(start, charge_host)


def run(main: Coroutine[Any, Any, T], start: float = 0.0, charge_host: bool = False) -> T:
    """Run `main` to completion on a new `SimEventLoop` with its clock as the process clock
    (`clock.now()`), then cancel what is left, shut down async generators and the default
    executor, and close the loop, as `asyncio.run` does. Returns `main`'s result; raises what
    it raises. Raises `RuntimeError` when called from a running event loop or inside another
    simulated run."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        main.close()
        raise RuntimeError("simtime.run() cannot be called from a running event loop")
    if clock.simulated():
        main.close()
        raise RuntimeError("simtime.run() inside another simulated run")
    loop = new_event_loop(start, charge_host)
    previous = clock._install(loop)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            clock._install(previous)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


__all__ = ["SimEventLoop", "new_event_loop", "run", "REAL_WAIT_S"]
