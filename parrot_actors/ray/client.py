"""`pa.Runtime.ray(address)`: the embedded runtime's Python API against a Ray deployment.

`async with pa.Runtime.ray(address="auto", engines=2) as rt:` connects to the cluster, finds the
named service actor (creating it, with its engines, when absent) and opens a session. Calling a
semantic function returns its output variables at once; calls, sets and cancels are sent in
numbered batches, one actor call per event-loop turn, never waiting on results, so the service
runs dependent calls without client round trips. `await var` asks the service for that one
variable (a server-side wait); the answer also carries resolved upstream values, so `value()`
works on them. Errors come back as the same typed exceptions (`CallError` chained to its cause,
e.g. `EngineDiedError`). Like `Runtime.connect`, `rt.stats()` is a coroutine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from parrot_actors.engines.engine import EngineConfig
from parrot_actors.errors import CallError, ParrotError, TemplateError
from parrot_actors.ray import cluster
from parrot_actors.ray.cluster import SERVICE_NAME
from parrot_actors.ray.deploy import call, connect_service
from parrot_actors.ray.spawn import SpawnOptions
from parrot_actors.ray.wire import (
    CancelOp,
    EngineStatus,
    Op,
    SetOp,
    SubmitOp,
    VarState,
    decode_error,
    encode_call,
)
from parrot_actors.runtime import CurrentRuntime, RuntimeStats
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.variables.graph import SemanticCall, check_acyclic
from parrot_actors.variables.perf import LATENCY
from parrot_actors.variables.variable import Variable

log = logging.getLogger("parrot_actors.ray")


class RayRuntime(CurrentRuntime):
    """The Parrot API on a Ray deployment, used like `pa.Runtime` (see the module docstring).

    address: the cluster ("auto": the local or job's cluster, "HOST:PORT", "ray://HOST:PORT").
    engines: engine count or `EngineConfig`s, and model: their model, used only when the
    service does not exist yet (then created, detached: it outlives this client). scheduler:
    its `SchedulerConfig` (also only at creation). service: the service actor's name.
    create: create a missing service (else `SessionError`). max_restarts: times Ray restarts a
    dead engine actor. spawn: full `SpawnOptions` (overrides max_restarts). timeout_s: seconds
    to wait for the service to start (model loads).

    Errors: `submit` raises `CallError` for a cycle or an output that already has a producer
    or value, `TemplateError` when not started; failures of calls surface when their outputs
    are awaited, as `CallError` chained to the cause.
    """

    def __init__(
        self,
        address: str = "auto",
        *,
        engines: int | Sequence[EngineConfig] | None = None,
        model: str = "default",
        scheduler: SchedulerConfig | None = None,
        service: str = SERVICE_NAME,
        create: bool = True,
        max_restarts: int = 3,
        spawn: SpawnOptions | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.address = address
        self.engines = engines
        self.model = model
        self.scheduler_config = scheduler
        self.service_name = service
        self.create = create
        self.spawn = spawn or SpawnOptions(max_restarts=max_restarts)
        self.timeout_s = timeout_s
        self.service: object | None = None
        self.session: str | None = None
        self._connected = False
        self._ops: list[Op] = []
        self._seq = 0
        self._flush_scheduled = False
        self._sent: set[str] = set()
        self._vars: dict[str, Variable] = {}
        self._tasks: set[asyncio.Task] = set()  # waits for variables
        self._applies: set[asyncio.Task] = set()  # batches being sent
        self._fetching: set[tuple[str, str]] = set()

    async def start(self) -> None:
        """Connect, find or create the service, open a session. Raises `ConnectionError`
        (no cluster), the service's start errors, `TimeoutError` past `timeout_s`."""
        cluster.acquire(self.address)
        self._connected = True
        try:
            self.service = await connect_service(
                self.service_name,
                self.engines,
                self.model,
                self.scheduler_config,
                self.spawn,
                self.create,
                self.timeout_s,
            )
            self.session = await call(self.service.open_session)
        except BaseException:
            self._disconnect()
            raise

    async def close(self) -> None:
        """Send what is queued, close the session (its unfinished calls are cancelled, and
        their variables here fail with `CallError`) and disconnect."""
        try:
            if self.session is not None:
                self._flush()
                await asyncio.gather(*list(self._applies), return_exceptions=True)
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
                await call(self.service.close_session, self.session)
        finally:
            self.session = None
            for var in self._vars.values():
                if var.producer is not None and not var.done():
                    var._fail(CallError(f"variable {var.name!r}: the Ray runtime was closed"))
            self._disconnect()

    def _disconnect(self) -> None:
        if self._connected:
            self._connected = False
            cluster.release()

    # ---- the graph --------------------------------------------------------------------------

    def submit(self, call_: SemanticCall) -> None:
        """Queue `call_` for the service and return at once (see the class docstring)."""
        if self.session is None:
            raise TemplateError("the Ray runtime is not started: use `async with`")
        check_acyclic(call_)
        failed = next((v for v in call_.inputs if v.done() and v._error is not None), None)
        for v in call_.outputs:
            v.producer = call_
        for v in call_.inputs:
            v.consumers.append(call_)
        if failed is not None:
            call_.state = "failed"
            for out in call_.outputs:
                err = CallError(f"{call_.function_name}#{call_.id}: input {failed.name!r} failed")
                err.__cause__ = failed._error
                out._fail(err)
            return
        self._send(SubmitOp(encode_call(call_, self._sent)))
        for v in call_.inputs + call_.outputs:
            self._track(v)
        for v in call_.outputs:
            if v._waiters:  # already awaited (an output passed in by the app)
                self._demand(v, LATENCY)

    def _track(self, var: Variable) -> None:
        if var._on_demand == self._demand:
            return
        var._on_demand = self._demand
        var._on_cancel = self._cancel
        self._vars[var.id] = var
        var._add_listener(self._resolved)

    def _resolved(self, var: Variable) -> None:
        # Only client-set values travel; produced values come from the service.
        if var.producer is None and var._error is None and var.id not in self._sent:
            self._sent.add(var.id)
            self._send(SetOp(var.id, var.value()))

    def _cancel(self, var: Variable) -> None:
        call_ = var.producer
        if call_ is not None and call_.state not in ("done", "failed"):
            call_.state = "failed"
            for out in call_.outputs:
                out._fail(CallError(f"{call_.function_name}#{call_.id} was cancelled"))
        self._send(CancelOp(var.id))

    def _demand(self, var: Variable, perf: str) -> None:
        if var.producer is None or self.session is None or (var.id, perf) in self._fetching:
            return
        self._flush()
        self._fetching.add((var.id, perf))
        self._spawn(self._fetch(var, perf, self._seq))

    # ---- sending ----------------------------------------------------------------------------

    def _send(self, op: Op) -> None:
        self._ops.append(op)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send the queued ops as the next numbered batch."""
        self._flush_scheduled = False
        if not self._ops or self.session is None:
            return
        ops, self._ops = self._ops, []
        seq, self._seq = self._seq, self._seq + 1
        task = asyncio.get_running_loop().create_task(self._apply(seq, ops))
        self._applies.add(task)
        task.add_done_callback(self._applies.discard)

    async def _apply(self, seq: int, ops: list[Op]) -> None:
        try:
            await call(self.service.apply, self.session, seq, ops)
        except ParrotError as exc:
            log.error("the service refused batch %d: %s", seq, exc)
            self._fail_ops(ops, exc)

    def _fail_ops(self, ops: list[Op], exc: ParrotError) -> None:
        for op in ops:
            if isinstance(op, SubmitOp):
                for p in op.call.pieces:
                    var = self._vars.get(p.var) if p.kind == "output" else None
                    if var is not None and not var.done():
                        err = CallError(f"{op.call.function}#{op.call.call_id}: {exc}")
                        err.__cause__ = exc
                        var._fail(err)

    async def _fetch(self, var: Variable, perf: str, after: int) -> None:
        try:
            state = await call(self.service.wait, self.session, after, var.id, perf)
        except ParrotError as exc:
            err = CallError(f"getting {var.name!r} from the service failed: {exc}")
            err.__cause__ = exc
            var._fail(err)
            return
        finally:
            self._fetching.discard((var.id, perf))
        self._settle(var, state)

    def _settle(self, var: Variable, state: VarState) -> None:
        touched = [var]
        for vid, value in state.resolved.items():
            other = self._vars.get(vid)
            if other is not None and other.producer is not None:
                other._resolve(value)
                touched.append(other)
        if state.error is not None:
            var._fail(decode_error(state.error))
        else:
            var._resolve(state.value or "")
        for call_ in {v.producer for v in touched}:  # mirror the call's end, as embedded
            if call_.state not in ("done", "failed") and all(o.done() for o in call_.outputs):
                call_.state = "failed" if any(o._error for o in call_.outputs) else "done"

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- introspection ----------------------------------------------------------------------

    async def stats(self) -> RuntimeStats:
        """Engine counters (all engines of the deployment) and this session's call counts. A
        coroutine, unlike the embedded `Runtime.stats()`."""
        self._flush()
        return await call(self.service.stats, self.session)

    async def call_log(self) -> list[tuple[str, int, str]]:
        """The scheduler's events for this session's calls, by client call id (see
        `ParrotService.call_log`)."""
        return await call(self.service.call_log, self.session)

    async def health(self) -> dict[str, bool]:
        """Engine name -> healthy (False while Ray restarts its actor)."""
        return await call(self.service.health)

    async def engine_status(self) -> list[EngineStatus]:
        """Each engine's health, incarnation, restarts seen and contexts refilled."""
        return await call(self.service.engine_status)
