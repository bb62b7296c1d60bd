"""Sessions: the unit of isolation of the Parrot API.

A session holds the variables its client created or its calls produce, under ids that mean
nothing to any other session, and the calls it submitted. Ending it (DELETE, or `ttl_s` seconds
without a request) cancels its unfinished calls, which frees their engine contexts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import AsyncIterator

from aiohttp import web

from parrot_actors import clock
from parrot_actors.errors import ParrotError
from parrot_actors.runtime import Runtime
from parrot_actors.server.config import ServerConfig
from parrot_actors.server.errors import (
    ConflictError,
    NotFoundError,
    TooManyPendingError,
    UnauthorizedError,
)
from parrot_actors.server.protocol import SessionClosed, SessionStats
from parrot_actors.variables.graph import SemanticCall, upstream
from parrot_actors.variables.lifecycle import CallState, finished
from parrot_actors.variables.variable import Variable

log = logging.getLogger("parrot_actors.server")

EXPECTED_IDS = 64
"""Variable ids a session's GETs may wait to be created at once (`Session.variable_soon`)."""
MAX_CREATED_WITHIN_S = 10.0
"""The longest a GET waits for its variable to be created (`?created_within=`)."""


class Session:
    """One client's view of the graph: variable ids -> `Variable`s, and its calls.

    ttl_s: seconds of inactivity before it ends. delivered: ids whose values the client has
    been sent (or sent itself), so `resolved` piggybacks each value once.
    """

    def __init__(self, session_id: str, token: str, ttl_s: float, config: ServerConfig) -> None:
        self.id = session_id
        self.token = token
        self.ttl_s = ttl_s
        self.config = config
        self.variables: dict[str, Variable] = {}
        self.ids: dict[Variable, str] = {}
        self.calls: dict[int, SemanticCall] = {}
        self.unfinished: dict[int, SemanticCall] = {}
        self.delivered: set[str] = set()
        self.last_seen = clock.now()
        self.active = 0
        self.closed = False
        self._ids = itertools.count()
        self._expected: dict[str, asyncio.Future[None]] = {}  # id -> set when registered

    def variable(self, var_id: str) -> Variable:
        """The session's variable `var_id`. Raises `NotFoundError` (404) for any id the session
        does not hold, including another session's ids."""
        var = self.variables.get(var_id)
        if var is None:
            raise NotFoundError(f"variable {var_id!r} does not exist in this session")
        return var

    async def variable_soon(self, var_id: str, within_s: float) -> Variable:
        """The session's variable `var_id`, waiting up to `within_s` seconds for it to be
        registered: a GET sent beside the batch that creates it may arrive first (two
        connections, no order between them). At most `EXPECTED_IDS` ids are awaited at once.
        Raises `NotFoundError` (404) when it does not exist by then."""
        var = self.variables.get(var_id)
        if var is not None or within_s <= 0:
            return self.variable(var_id)
        fut = self._expected.get(var_id)
        if fut is None:
            if len(self._expected) >= EXPECTED_IDS:
                return self.variable(var_id)
            fut = self._expected[var_id] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(fut), within_s)
        except asyncio.TimeoutError:
            pass
        finally:
            if self._expected.get(var_id) is fut and not fut.done():
                del self._expected[var_id]
        return self.variable(var_id)

    def check_new_id(self, var_id: str) -> None:
        """Raise `ConflictError` if `var_id` is taken, `TooManyPendingError` at the variable
        limit."""
        if var_id in self.variables:
            raise ConflictError(f"variable id {var_id!r} is already in use in this session")
        if len(self.variables) >= self.config.max_variables:
            raise TooManyPendingError(
                f"the session holds {len(self.variables)} variables, its limit"
            )

    def register(self, var_id: str, var: Variable, delivered: bool = False) -> None:
        """Add `var` under `var_id` (see `check_new_id` for the errors)."""
        self.check_new_id(var_id)
        self.variables[var_id] = var
        self.ids[var] = var_id
        fut = self._expected.pop(var_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
        if delivered:
            self.delivered.add(var_id)

    def new_id(self) -> str:
        """A variable id not yet used in this session."""
        while True:
            var_id = f"s{next(self._ids)}"
            if var_id not in self.variables:
                return var_id

    def pending_calls(self) -> int:
        """Calls submitted and not yet done or failed."""
        for cid in [c for c, call in self.unfinished.items() if finished(call)]:
            del self.unfinished[cid]
        return len(self.unfinished)

    def check_can_submit(self) -> None:
        """Raise `TooManyPendingError` (429) at the pending-call limit."""
        if self.pending_calls() >= self.config.max_pending_calls:
            raise TooManyPendingError(
                f"the session has {self.config.max_pending_calls} pending calls, its limit; "
                "await some results first"
            )

    def stats(self) -> SessionStats:
        """The session's own counters (see `SessionStats`)."""
        calls = list(self.calls.values())
        done = sum(c.state is CallState.DONE for c in calls)
        failed = sum(c.state is CallState.FAILED for c in calls)
        return SessionStats(
            session_id=self.id,
            calls_submitted=len(calls),
            calls_completed=done,
            calls_failed=failed,
            calls_pending=len(calls) - done - failed,
            prompt_tokens=sum(c.prompt_tokens for c in calls),
            generated_tokens=sum(c.completion_tokens for c in calls),
        )

    def add_call(self, call: SemanticCall) -> None:
        """Remember a submitted call."""
        self.calls[call.id] = call
        self.unfinished[call.id] = call

    def take_resolved(self, var: Variable) -> dict[str, str]:
        """Values of the session's variables upstream of `var` (its producer's inputs and
        outputs, and so on up) that resolved and were not sent yet; marks them sent."""
        out: dict[str, str] = {}
        if var.producer is None:
            return out
        for call in upstream(var.producer):
            for v in (*call.inputs, *call.outputs):
                vid = self.ids.get(v)
                if vid is None or vid in self.delivered or v is var or not v.done():
                    continue
                try:
                    out[vid] = v.value()
                except ParrotError:
                    continue
                self.delivered.add(vid)
        return out


class SessionManager:
    """All live sessions: creation, bearer-token lookup, expiry and teardown.

    runtime: the shared embedded runtime (its scheduler's running tasks are awaited on
    teardown, so KV is free when DELETE answers).
    """

    def __init__(self, runtime: Runtime, config: ServerConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.by_token: dict[str, Session] = {}
        self._ids = itertools.count(1)
        self._reaper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.by_token)

    def create(self, ttl_s: float | None) -> Session:
        """A new session (ttl capped by the config). Raises `TooManyPendingError` at the
        session limit."""
        if len(self.by_token) >= self.config.max_sessions:
            raise TooManyPendingError(
                f"the server holds {len(self.by_token)} sessions, its limit; try again later"
            )
        ttl = min(ttl_s or self.config.session_ttl_s, self.config.max_session_ttl_s)
        token = secrets.token_urlsafe(24)
        session = Session(f"session{next(self._ids)}", token, ttl, self.config)
        self.by_token[token] = session
        return session

    def authenticate(self, request: web.Request) -> Session:
        """The session of the request's `Authorization: Bearer <token>`. Raises
        `UnauthorizedError` (401) when there is none or it names no live session."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthorizedError(
                "missing session token: send 'Authorization: Bearer <token>' "
                "(POST /v1/sessions creates one)"
            )
        session = self.by_token.get(token.strip())
        if session is None:
            raise UnauthorizedError("unknown or expired session token")
        return session

    @contextlib.asynccontextmanager
    async def use(self, request: web.Request) -> AsyncIterator[Session]:
        """Authenticate and mark the session busy for the request's duration (a session with a
        request in flight never expires)."""
        session = self.authenticate(request)
        session.active += 1
        try:
            yield session
        finally:
            session.active -= 1
            session.last_seen = clock.now()

    async def close(self, session: Session) -> SessionClosed:
        """End `session`: cancel its unfinished calls and pending variables (their waiters
        raise `CallError`), wait up to `config.teardown_s` seconds for the cancelled calls to
        free their contexts, and forget its variables."""
        self.by_token.pop(session.token, None)
        session.closed = True
        cancelled = [c for c in session.calls.values() if not finished(c)]
        for call in cancelled:
            for out in call.outputs:
                out.cancel()
        for var in session.variables.values():
            var.cancel()
        await self.reclaim([c.id for c in cancelled])
        freed = len(session.variables)
        session.variables.clear()
        session.ids.clear()
        session.calls.clear()
        session.unfinished.clear()
        return SessionClosed(
            session_id=session.id, cancelled_calls=len(cancelled), freed_variables=freed
        )

    async def reclaim(self, call_ids: list[int]) -> None:
        """Wait up to `config.teardown_s` seconds for the cancelled calls `call_ids` to stop and
        for the engines to apply their frees."""
        scheduler = self.runtime.scheduler
        assert scheduler is not None, "the service runs over a started runtime"
        tasks = scheduler.tasks_of(set(call_ids))
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.teardown_s)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.runtime.flush(), self.config.teardown_s)

    def start_reaper(self) -> None:
        """Start the task that ends sessions idle for longer than their ttl."""
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval_s)
            now = clock.now()
            for session in list(self.by_token.values()):
                if session.active == 0 and now - session.last_seen > session.ttl_s:
                    try:
                        await self.close(session)
                    except Exception:  # one bad teardown must not end expiry for everyone
                        log.exception("ending idle session %s failed", session.id)

    async def close_all(self) -> None:
        """Stop the reaper and end every session."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for session in list(self.by_token.values()):
            await self.close(session)
