"""The Parrot API: sessions, semantic calls, variables, stats.

The client sends calls as it makes them (one request per call, or a batch of the calls it has
queued in one request) and never waits between dependent ones; the shared runtime starts
each call the moment its inputs resolve and an output is wanted. A GET on a variable is the
"want": it waits server-side with the requested objective (`perf`) and answers with the value.

Routes (all but POST /v1/sessions need `Authorization: Bearer <token>`):
  POST   /v1/sessions                  CreateSession -> 201 SessionCreated
  DELETE /v1/session                   -> SessionClosed (cancels calls, frees contexts)
  POST   /v1/calls                     SubmitCall -> 201 CallAccepted
  POST   /v1/calls/batch               SubmitCalls -> 201 CallsAccepted (207: one refused)
  POST   /v1/variables                 CreateVariable -> 201 VariableState
  PUT    /v1/variables/{id}            SetVariable -> VariableState
  GET    /v1/variables/{id}            ?perf=latency|throughput&timeout=SECONDS -> VariableState
  GET    /v1/variables/{id}/stream     same query -> text/event-stream of `token` events, then
                                       one `done` (VariableState) or `error` (ErrorResponse)
  POST   /v1/variables/{id}/cancel     -> CancelResult
  GET    /v1/stats                     -> SessionStats (the session's own counters only)
  GET    /v1/events                    -> CallEvents (scheduling events of the session's calls)
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import msgspec
from aiohttp import web

from parrot_actors import clock
from parrot_actors.errors import ParrotError
from parrot_actors.runtime import Runtime
from parrot_actors.server.calls import build_call
from parrot_actors.server.config import ServerConfig
from parrot_actors.server.errors import GetTimeoutError, TooManyPendingError, error_body
from parrot_actors.server.http import (
    SSE_HEADERS,
    json_response,
    query_choice,
    query_float,
    read_body,
    sse_event,
)
from parrot_actors.server.metrics import Metrics
from parrot_actors.server.protocol import (
    CallAccepted,
    CallEvents,
    CallsAccepted,
    CancelResult,
    CreateSession,
    CreateVariable,
    ErrorResponse,
    SessionCreated,
    SetVariable,
    SubmitCall,
    SubmitCalls,
    TokenEvent,
    VariableState,
)
from parrot_actors.server.sessions import MAX_CREATED_WITHIN_S, Session, SessionManager
from parrot_actors.variables.perf import OBJECTIVES
from parrot_actors.variables.variable import Variable


class ParrotAPI:
    """Handlers of the Parrot API over one shared runtime."""

    def __init__(
        self, runtime: Runtime, sessions: SessionManager, config: ServerConfig, metrics: Metrics
    ) -> None:
        self.runtime = runtime
        self.sessions = sessions
        self.config = config
        self.metrics = metrics
        self.tap = runtime.tap
        self._background: set[asyncio.Task[None]] = set()

    def routes(self) -> list[web.RouteDef]:
        """The API's routes."""
        return [
            web.post("/v1/sessions", self.create_session),
            web.delete("/v1/session", self.delete_session),
            web.post("/v1/calls", self.submit),
            web.post("/v1/calls/batch", self.submit_batch),
            web.post("/v1/variables", self.create_variable),
            web.put("/v1/variables/{id}", self.set_variable),
            web.get("/v1/variables/{id}", self.get_variable),
            web.get("/v1/variables/{id}/stream", self.stream_variable),
            web.post("/v1/variables/{id}/cancel", self.cancel_variable),
            web.get("/v1/stats", self.stats),
            web.get("/v1/events", self.events),
        ]

    # ---- sessions ---------------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        """POST /v1/sessions."""
        body = await read_body(request, CreateSession, self.config.max_body_bytes, True)
        s = self.sessions.create(body.ttl_s)
        return json_response(
            SessionCreated(
                session_id=s.id,
                token=s.token,
                ttl_s=s.ttl_s,
                max_pending_calls=self.config.max_pending_calls,
            ),
            status=201,
        )

    async def delete_session(self, request: web.Request) -> web.Response:
        """DELETE /v1/session: answers once the session's contexts are freed."""
        session = self.sessions.authenticate(request)
        return json_response(await self.sessions.close(session))

    # ---- calls ------------------------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.Response:
        """POST /v1/calls."""
        async with self.sessions.use(request) as s:
            req = await read_body(request, SubmitCall, self.config.max_body_bytes)
            return json_response(self._take(s, req), status=201)

    async def submit_batch(self, request: web.Request) -> web.Response:
        """POST /v1/calls/batch: the calls in order, as many POST /v1/calls. A refused call
        ends the batch: 207 with the calls taken before it and its error (the session keeps
        serving; the client resends the rest)."""
        async with self.sessions.use(request) as s:
            req = await read_body(request, SubmitCalls, self.config.max_body_bytes)
            accepted: list[CallAccepted] = []
            for call in req.calls:
                try:
                    accepted.append(self._take(s, call))
                except ParrotError as exc:
                    body = CallsAccepted(accepted=accepted, error=error_body(exc))
                    return json_response(body, status=207)
            return json_response(CallsAccepted(accepted=accepted), status=201)

    def _take(self, s: Session, req: SubmitCall) -> CallAccepted:
        """Build `req`, put it in the graph and in session `s`. Raises the `ParrotError` that
        refuses it (bad template or args, too many pending calls or variables)."""
        s.check_can_submit()
        prepared = build_call(s, req)
        if len(s.variables) + len(prepared.new_vars) > self.config.max_variables:
            raise TooManyPendingError(
                f"the call would take the session over {self.config.max_variables} variables"
            )
        prepared.call.program = program_of(s.id)  # a session's calls are one program
        self.runtime.submit(prepared.call)
        for var_id, var in prepared.new_vars.items():
            s.register(var_id, var, delivered=var_id in prepared.inline)
        s.add_call(prepared.call)
        return CallAccepted(call_id=prepared.call.id, outputs=prepared.outputs)

    # ---- variables --------------------------------------------------------------------------

    async def create_variable(self, request: web.Request) -> web.Response:
        """POST /v1/variables."""
        async with self.sessions.use(request) as s:
            req = await read_body(request, CreateVariable, self.config.max_body_bytes)
            var_id = req.id or s.new_id()
            s.check_new_id(var_id)
            var = Variable(req.value, name=req.name or var_id)
            s.register(var_id, var, delivered=req.value is not None)
            return json_response(self.state(s, var), status=201)

    async def set_variable(self, request: web.Request) -> web.Response:
        """PUT /v1/variables/{id}. 409 if it is set already or a call produces it."""
        async with self.sessions.use(request) as s:
            var = s.variable(request.match_info["id"])
            req = await read_body(request, SetVariable, self.config.max_body_bytes)
            var.set(req.value)
            s.delivered.add(request.match_info["id"])
            return json_response(self.state(s, var))

    async def cancel_variable(self, request: web.Request) -> web.Response:
        """POST /v1/variables/{id}/cancel: its producer stops; downstream gets fail."""
        async with self.sessions.use(request) as s:
            var_id = request.match_info["id"]
            cancelled = s.variable(var_id).cancel()
            return json_response(CancelResult(id=var_id, cancelled=cancelled))

    def _wait_query(self, request: web.Request) -> tuple[str, float]:
        perf = query_choice(request, "perf", "latency", OBJECTIVES)
        timeout = query_float(
            request,
            "timeout",
            self.config.default_get_timeout_s,
            0.0,
            self.config.max_get_timeout_s,
        )
        return perf, timeout

    async def get_variable(self, request: web.Request) -> web.Response:
        """GET /v1/variables/{id}: wait up to `timeout` seconds (0: answer at once, still
        asking for the value) with objective `perf`. 504 when it is still pending.
        `created_within` (seconds, at most `MAX_CREATED_WITHIN_S`): a variable not there yet
        may be created that long after this request arrives (a GET sent beside the batch
        that creates it, so the wait costs no round trip of its own); 404 after that."""
        async with self.sessions.use(request) as s:
            within = query_float(request, "created_within", 0.0, 0.0, MAX_CREATED_WITHIN_S)
            var = await s.variable_soon(request.match_info["id"], within)
            perf, timeout = self._wait_query(request)
            if not var.done():
                start = clock.now()
                getter = asyncio.ensure_future(var.get(perf))
                getter.add_done_callback(_retrieve)
                try:
                    await asyncio.wait({getter}, timeout=timeout)
                finally:
                    getter.cancel()
                self.metrics.variable_wait.observe(clock.now() - start)
                if not var.done() and timeout > 0:
                    raise GetTimeoutError(
                        f"variable {request.match_info['id']!r} is still pending "
                        f"after {timeout:g} s"
                    )
            return json_response(self.state(s, var))

    async def stream_variable(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/variables/{id}/stream: `token` events as the producer generates, then
        `done` or `error`. Closing the stream early cancels the variable's producer."""
        async with self.sessions.use(request) as s:
            var = s.variable(request.match_info["id"])
            perf, timeout = self._wait_query(request)
            resp = web.StreamResponse(headers=SSE_HEADERS)
            await resp.prepare(request)
            queue: asyncio.Queue[str | None] = asyncio.Queue()
            stop = self.tap.listen(
                var, lambda delta, _: queue.put_nowait(delta.text) if delta.text else None
            )
            getter = asyncio.ensure_future(var.get(perf))

            def settled(task: asyncio.Future[str]) -> None:
                _retrieve(task)
                queue.put_nowait(None)

            getter.add_done_callback(settled)
            try:
                sent = await self._relay(resp, queue, timeout)
                if sent is None:
                    err = GetTimeoutError(f"variable still pending after {timeout:g} s")
                    await resp.write(sse_event(_encode_error(err), "error"))
                else:
                    await self._finish_stream(resp, s, var, sent)
            except (asyncio.CancelledError, ConnectionResetError):
                # The client went away: its work stops and its context is freed.
                if var.cancel() and var.producer is not None:
                    self._spawn(self.sessions.reclaim([var.producer.id]))
                raise
            finally:
                stop()
                getter.cancel()
            await resp.write_eof()
            return resp

    async def _relay(
        self, resp: web.StreamResponse, queue: asyncio.Queue[str | None], timeout: float
    ) -> str | None:
        """Forward token texts until the variable settles; the text sent, or None on timeout."""
        sent: list[str] = []
        deadline = clock.now() + timeout
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), max(0.0, deadline - clock.now()))
            except asyncio.TimeoutError:
                return None
            if item is None:
                return "".join(sent)
            sent.append(item)
            await resp.write(sse_event(msgspec.json.encode(TokenEvent(text=item)), "token"))

    async def _finish_stream(
        self, resp: web.StreamResponse, s: Session, var: Variable, sent: str
    ) -> None:
        state = self.state(s, var)
        if state.state == "failed":
            assert state.error is not None, "`state` gives a failed variable its error"
            body = msgspec.json.encode(ErrorResponse(error=state.error))
            await resp.write(sse_event(body, "error"))
            return
        # Tokens that came before we listened go as one event.
        if (
            state.value is not None
            and state.value.startswith(sent)
            and len(state.value) > len(sent)
        ):
            rest = TokenEvent(text=state.value[len(sent) :])
            await resp.write(sse_event(msgspec.json.encode(rest), "token"))
        await resp.write(sse_event(msgspec.json.encode(state), "done"))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # a strong reference until it is done
        task.add_done_callback(self._background.discard)

    def state(self, s: Session, var: Variable) -> VariableState:
        """The wire state of `var`, with the upstream values the client has not seen yet."""
        var_id = s.ids.get(var, var.name)  # the session may have ended while we waited
        if not var.done():
            return VariableState(id=var_id, name=var.name, state="pending")
        try:
            value = var.value()
        except ParrotError as exc:
            return VariableState(id=var_id, name=var.name, state="failed", error=error_body(exc))
        s.delivered.add(var_id)
        return VariableState(
            id=var_id, name=var.name, state="done", value=value, resolved=s.take_resolved(var)
        )

    async def stats(self, request: web.Request) -> web.Response:
        """GET /v1/stats: the session's own counters; engine-wide ones are on /metrics."""
        return json_response(self.sessions.authenticate(request).stats())

    async def events(self, request: web.Request) -> web.Response:
        """GET /v1/events: where and how the session's calls ran (see `CallEvents`)."""
        mine = self.sessions.authenticate(request).calls
        scheduler = self.runtime.scheduler
        assert scheduler is not None, "the service runs over a started runtime"
        log = scheduler.event_log
        return json_response(CallEvents(events=[e for e in log if e[1] in mine]))


def _retrieve(task: asyncio.Future[str]) -> None:
    # A variable's failure is reported in its state; mark the task's exception as seen.
    if not task.cancelled():
        task.exception()


def _encode_error(exc: BaseException) -> bytes:
    return msgspec.json.encode(ErrorResponse(error=error_body(exc)))


def program_of(session_id: str) -> str:
    """The program of a Parrot session's calls (OpenAI sessions are "openai:<id>", so the two
    APIs never share one)."""
    return f"session:{session_id}"
