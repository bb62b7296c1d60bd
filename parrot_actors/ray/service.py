"""The scheduler as a named, detached Ray actor: `ParrotService`.

It runs the unchanged embedded `Runtime` (graph bookkeeping + `Scheduler`) over `RayEngine`
proxies of the engine actors, and mirrors each client's graph in a session: clients send their
calls, sets and cancels in numbered batches (applied strictly in order, whatever order Ray
delivers them in), and `wait` for a variable server-side. The graph lives here, so dependent
calls start without any client round trip, as embedded.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

import msgspec

from parrot_actors.engines.engine import EngineConfig
from parrot_actors.errors import CallError, ParrotError, SessionError
from parrot_actors.ray.proxy import RayEngine
from parrot_actors.ray.spawn import SpawnOptions, spawn_engines
from parrot_actors.ray.wire import (
    CallMsg,
    CancelOp,
    EngineStatus,
    Op,
    SetOp,
    SubmitOp,
    VarState,
    encode_error,
)
from parrot_actors.runtime import Runtime, RuntimeStats
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.variables.graph import Piece, SemanticCall, upstream
from parrot_actors.variables.variable import Variable


class _Session:
    """One client's mirror of its graph: client variable id -> variable, server call id ->
    (client call id, call), and how many op batches were applied."""

    def __init__(self) -> None:
        self.vars: dict[str, Variable] = {}
        self.client_ids: dict[str, str] = {}
        self.calls: dict[int, tuple[int, SemanticCall]] = {}
        self.applied = 0
        self.changed = asyncio.Condition()
        self.waiting = 0
        self.touched = time.monotonic()


class ParrotService:
    """The service actor body (see the module docstring).

    engines: `EngineConfig`s of the engine actors (spawned, or attached to by name).
    scheduler: `SchedulerConfig`. spawn: `SpawnOptions`. turn_timeout_s: seconds a batch waits
    for the batches numbered before it (a lost batch fails later ones with `SessionError`).
    session_ttl_s: idle sessions (no call from their client, no wait in flight) are closed
    after this many seconds.
    """

    def __init__(
        self,
        engines: Sequence[EngineConfig],
        scheduler: SchedulerConfig | None = None,
        spawn: SpawnOptions | None = None,
        turn_timeout_s: float = 60.0,
        session_ttl_s: float = 3600.0,
    ) -> None:
        self.scheduler_config = (scheduler or SchedulerConfig()).validate()
        caching = self.scheduler_config.automatic_prefix_caching
        self.engine_configs = [msgspec.structs.replace(c, prefix_caching=caching) for c in engines]
        self.spawn_options = spawn or SpawnOptions()
        self.turn_timeout_s = turn_timeout_s
        self.session_ttl_s = session_ttl_s
        self.runtime: Runtime | None = None
        self.proxies: list[RayEngine] = []
        self.sessions: dict[str, _Session] = {}
        self._starting: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Spawn or attach to the engines and start the scheduler (once; later calls wait for
        the first). Returns the engine names. Raises the engines' build errors."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)
        return [p.name for p in self.proxies]

    async def _start(self) -> None:
        handles = await spawn_engines(self.engine_configs, self.spawn_options)
        proxies = await asyncio.gather(*(RayEngine.connect(h) for h in handles))
        runtime = Runtime(engines=list(proxies), scheduler=self.scheduler_config)
        await runtime.start()
        for proxy in proxies:  # the scheduler listens to their health itself
            proxy.start_monitor()
        self.proxies, self.runtime = list(proxies), runtime

    async def shutdown(self) -> list[str]:
        """Cancel what runs and stop the scheduler; returns the engine names (engine actors
        this service created end with the service actor: see `shutdown_deployment`)."""
        if self.runtime is not None:
            await self.runtime.close()
        for proxy in self.proxies:
            await proxy.close()
        return [p.name for p in self.proxies]

    # ---- sessions -------------------------------------------------------------------------

    async def open_session(self) -> str:
        """A new session id (and idle sessions past their TTL are closed)."""
        await self.start()
        now = time.monotonic()
        for sid, sess in list(self.sessions.items()):
            if not sess.waiting and now - sess.touched > self.session_ttl_s:
                await self.close_session(sid)
        sid = uuid.uuid4().hex
        self.sessions[sid] = _Session()
        return sid

    async def close_session(self, session: str) -> None:
        """Cancel the session's unfinished calls and forget its graph."""
        sess = self.sessions.pop(session, None)
        if sess is None:
            return
        for var in sess.vars.values():
            if var.producer is not None and not var.done():
                var.cancel()

    def _session(self, session: str) -> _Session:
        sess = self.sessions.get(session)
        if sess is None:
            raise SessionError(f"session {session!r} is unknown or closed")
        sess.touched = time.monotonic()
        return sess

    async def _turn(self, sess: _Session, seq: int) -> None:
        """Wait until the batches numbered below `seq` were applied."""
        async with sess.changed:
            try:
                await asyncio.wait_for(
                    sess.changed.wait_for(lambda: sess.applied >= seq), self.turn_timeout_s
                )
            except asyncio.TimeoutError:
                raise SessionError(
                    f"batch {seq} waited {self.turn_timeout_s} s for batch {sess.applied}"
                ) from None

    # ---- the client API -------------------------------------------------------------------

    async def apply(self, session: str, seq: int, ops: list[Op]) -> None:
        """Apply the session's batch number `seq` (after every earlier batch). Raises
        `SessionError` for an unknown session or a batch that waited too long."""
        sess = self._session(session)
        await self._turn(sess, seq)
        try:
            for op in ops:
                self._apply(sess, op)
        finally:
            async with sess.changed:
                sess.applied = max(sess.applied, seq + 1)
                sess.changed.notify_all()

    def _apply(self, sess: _Session, op: Op) -> None:
        if isinstance(op, SubmitOp):
            self._submit(sess, op.call)
        elif isinstance(op, SetOp):
            var = self._var(sess, op.var, op.var)
            if not var.done() and var.producer is None:
                var.set(op.value)
        elif isinstance(op, CancelOp) and op.var in sess.vars:
            sess.vars[op.var].cancel()

    def _var(self, sess: _Session, client_id: str, name: str) -> Variable:
        var = sess.vars.get(client_id)
        if var is None:
            var = sess.vars[client_id] = Variable(name=name)
            sess.client_ids[var.id] = client_id
        return var

    def _submit(self, sess: _Session, msg: CallMsg) -> None:
        pieces = []
        for p in msg.pieces:
            if p.kind == "text":
                pieces.append(Piece("text", text=p.text))
                continue
            var = self._var(sess, p.var, p.name)
            if p.value is not None and not var.done() and var.producer is None:
                var.set(p.value)
            pieces.append(Piece(p.kind, var=var, sampling=tuple(p.sampling)))
        call = SemanticCall(msg.function, pieces, model=msg.model, chat=msg.chat)
        sess.calls[call.id] = (msg.call_id, call)
        try:
            self.runtime.submit(call)
        except ParrotError as exc:
            for out in call.outputs:
                err = CallError(f"{msg.function}#{msg.call_id}: the service refused it: {exc}")
                err.__cause__ = exc
                out._fail(err)

    async def wait(self, session: str, after: int, var_id: str, perf: str) -> VarState:
        """The value or error of the session's variable `var_id` once it resolves, asked for
        with objective `perf` (after batch `after` - 1 was applied), plus resolved upstream
        values. Raises `SessionError` for an unknown session or variable."""
        sess = self._session(session)
        sess.waiting += 1
        try:
            await self._turn(sess, after)
            var = sess.vars.get(var_id)
            if var is None:
                raise SessionError(f"variable {var_id!r} is unknown to session {session!r}")
            try:
                state = VarState(value=await var.get(perf=perf))
            except ParrotError as exc:
                state = VarState(error=encode_error(exc))
            return msgspec.structs.replace(state, resolved=self._upstream(sess, var))
        finally:
            sess.waiting -= 1
            sess.touched = time.monotonic()

    def _upstream(self, sess: _Session, var: Variable) -> dict[str, str]:
        if var.producer is None:
            return {}
        out = {}
        for call in upstream(var.producer):
            for v in call.outputs:
                cid = sess.client_ids.get(v.id)
                if cid is not None and v is not var and v.done() and v._error is None:
                    out[cid] = v.value()
        return out

    # ---- introspection --------------------------------------------------------------------

    async def stats(self, session: str | None = None) -> RuntimeStats:
        """Engine counters (fresh) and call counts: of `session`, or of every call."""
        await self.start()
        await asyncio.gather(*(p.refresh() for p in self.proxies))
        stats = self.runtime.stats()
        if session is None:
            return stats
        states = [call.state for _, call in self._session(session).calls.values()]
        return msgspec.structs.replace(
            stats, calls_completed=states.count("done"), calls_failed=states.count("failed")
        )

    async def call_log(self, session: str) -> list[tuple[str, int, str]]:
        """The scheduler's event log (see `Scheduler.event_log`) for the session's calls, with
        the client's call ids: ("ready" | "dispatch" | "retry" | "resolved" | "done" |
        "failed", client call id, detail)."""
        calls = self._session(session).calls
        log = self.runtime.scheduler.event_log
        return [(ev, calls[cid][0], detail) for ev, cid, detail in log if cid in calls]

    async def health(self) -> dict[str, bool]:
        """Engine name -> healthy (False while Ray restarts it)."""
        return {p.name: p.healthy for p in self.proxies}

    async def engine_status(self) -> list[EngineStatus]:
        """Each engine's health, incarnation and fault counters, in order."""
        return [p.status() for p in self.proxies]

    async def engine_names(self) -> list[str]:
        """The engines' names, in order."""
        await self.start()
        return [p.name for p in self.proxies]
