"""`pa.Runtime.connect(url)`: the embedded runtime's Python API against a running service.

Calling a semantic function inside `async with pa.Runtime.connect(url) as rt:` returns its
output variables at once, as embedded. Submissions, sets and cancels go to the service in
order through one sender task, never waiting on results: the calls the app made since the
sender last ran travel together in one POST /v1/calls/batch (a lone call as POST /v1/calls),
so a graph built in one go costs one request however many calls it has and however deep it
is; the service runs each call when its inputs resolve. `await var` sends ONE waiting GET
for that variable; the answer also carries the values of its upstream variables, so
`value()` works on them without more requests.
Client-side `pa.Variable("...")` values travel inline with the first submission that uses
them. Service errors come back as the same typed exceptions (`CallError` chained to its cause,
`TemplateError`, ...). Unlike the embedded runtime, `rt.stats()` is a coroutine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from typing import Literal, TypeAlias, TypeVar, overload

import aiohttp
import msgspec

from parrot_actors.errors import CallError, ParrotError, TemplateError
from parrot_actors.server.client_wire import encode_call, error_from_response
from parrot_actors.server.errors import GetTimeoutError, NotFoundError, exception_from
from parrot_actors.server.protocol import (
    CallAccepted,
    CallEvents,
    CallsAccepted,
    CreateSession,
    SessionCreated,
    SessionStats,
    SetVariable,
    SubmitCall,
    SubmitCalls,
    VariableState,
)
from parrot_actors.variables.current import CurrentRuntime
from parrot_actors.variables.graph import SemanticCall, link
from parrot_actors.variables.lifecycle import CallState, advance, finished
from parrot_actors.variables.perf import LATENCY
from parrot_actors.variables.variable import Variable

log = logging.getLogger("parrot_actors.client")

API_KEY_ENV = "PARROT_ACTORS_API_KEY"
"""Environment variable holding the service's API key (read by `serve` and by clients)."""

T = TypeVar("T")

_Item: TypeAlias = (
    tuple[Literal["call"], SemanticCall]
    | tuple[Literal["get"], Variable, str]
    | tuple[Literal["set", "cancel"], Variable]
    | tuple[Literal["flush"], asyncio.Future[None]]
)
"""What the sender sends, in order: a call, a waiting GET (with its objective), a set, a
cancel, or a flush marker (resolved once everything before it was sent)."""

BATCH_CALLS = 64
"""Most calls the client sends in one POST /v1/calls/batch."""
BATCH_BYTES = 256 << 10
"""A batch closes once its JSON passes this size (bytes), well under the service's default
`max_body_bytes` (1 MiB)."""
_CANCELLED = CallError("cancelled before it was sent")
EARLY_GET_S = 5.0
"""Seconds the service waits for the batch that creates a variable fetched beside it."""


class RemoteRuntime(CurrentRuntime):
    """The Parrot API over HTTP, used like `pa.Runtime` (see the module docstring).

    url: the service's base URL. session_ttl_s: inactivity timeout of the session (seconds;
    None = the server's default). get_timeout_s: server-side wait of one GET (seconds; the
    client re-asks after a 504). request_timeout_s: limit of every other request (seconds).
    trace_configs: aiohttp `TraceConfig`s (e.g. to count requests). max_connections: pooled
    keep-alive connections. api_key: the service's API key (`serve --api-key`), sent as
    `X-Api-Key` on every request; None reads `PARROT_ACTORS_API_KEY` from the environment.
    `requests_sent` counts HTTP requests made.

    Errors: `submit` raises `CallError` for a cycle or an output that already has a producer
    (as embedded); everything the service rejects surfaces when the affected variable is
    awaited, as `CallError` chained to the service's typed error.
    """

    def __init__(
        self,
        url: str,
        *,
        session_ttl_s: float | None = None,
        get_timeout_s: float = 300.0,
        request_timeout_s: float = 60.0,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
        max_connections: int = 64,
        api_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.session_ttl_s = session_ttl_s
        self.get_timeout_s = get_timeout_s
        self.request_timeout_s = request_timeout_s
        self.trace_configs = trace_configs or []
        self.max_connections = max_connections
        self.session_id: str | None = None
        self.requests_sent = 0
        self._http: aiohttp.ClientSession | None = None
        api_key = api_key or os.environ.get(API_KEY_ENV)
        self._key: dict[str, str] = {"X-Api-Key": api_key} if api_key else {}
        self._auth: dict[str, str] = {}
        self._queue: asyncio.Queue[_Item] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._known: set[str] = set()
        self._pending_remote: set[str] = set()
        self._vars: weakref.WeakValueDictionary[str, Variable] = weakref.WeakValueDictionary()
        self._fetching: dict[str, asyncio.Task[None] | None] = {}
        self._call_ids: dict[int, int] = {}  # the service's call id -> ours

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the connection pool, create the session and start the sender. Raises the
        service's typed error, or `aiohttp.ClientError` when it cannot be reached."""
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections),
            trace_configs=self.trace_configs,
        )
        try:
            created = await self._request(
                "POST",
                "/v1/sessions",
                CreateSession(ttl_s=self.session_ttl_s),
                type_=SessionCreated,
            )
        except BaseException:
            await self._http.close()
            raise
        self.session_id = created.session_id
        self._auth = {"Authorization": f"Bearer {created.token}"}
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queue = queue
        self._sender = asyncio.get_running_loop().create_task(self._send_loop(queue))

    async def close(self) -> None:
        """Stop sending, end the session (the service cancels its calls and frees their
        contexts) and fail every variable still pending here with `CallError`."""
        tasks = [t for t in (self._sender, *self._fetching.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sender = None
        self._queue = None
        if self._http is not None:
            if self._auth:
                try:
                    await self._request("DELETE", "/v1/session")
                except (ParrotError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    log.warning("ending session %s failed: %s", self.session_id, exc)
            await self._http.close()
            self._http = None
        for var in list(self._vars.values()):
            if not var.done():
                var.fail(CallError(f"variable {var.name!r}: the remote runtime was closed"))

    # ---- the graph (same contract as Runtime.submit) ---------------------------------------

    def submit(self, call: SemanticCall) -> None:
        """Queue `call` for the service and return at once. Raises `CallError` for a cycle or
        an output that already has a producer or value, `TemplateError` when not started."""
        if self._queue is None:
            raise TemplateError("the remote runtime is not started: use `async with`")
        link(call)
        for v in call.inputs + call.outputs:
            self._vars[v.id] = v
            if not v.owned_by(self):
                v.attach(self)
        self._queue.put_nowait(("call", call))
        for v in call.outputs:
            if v.awaited:  # someone already awaits this variable
                self.on_demand(v, LATENCY)

    # ---- what variables report (`VariableOwner`) ---------------------------------------------

    def on_demand(self, var: Variable, perf: str) -> None:
        """Someone awaits `var`: ask the service for it (one waiting GET)."""
        # Variables with no producer resolve only by a local set; nothing to ask for.
        if var.producer is None or var.id in self._fetching or self._queue is None:
            return
        self._fetching[var.id] = None
        self._queue.put_nowait(("get", var, perf))

    def on_settled(self, var: Variable) -> None:
        """A variable the app set travels to the service (produced ones come from it)."""
        if var.producer is None and var.error is None and self._queue is not None:
            self._queue.put_nowait(("set", var))

    def on_cancel(self, var: Variable) -> None:
        """The app cancelled `var`: its call fails here and is cancelled in the service."""
        call = var.producer
        if call is not None and advance(call, CallState.FAILED):
            for out in call.outputs:
                out.fail(CallError(f"{call.function_name}#{call.id} was cancelled"))
        if self._queue is not None:
            self._queue.put_nowait(("cancel", var))

    # ---- the sender -------------------------------------------------------------------------

    async def _send_loop(self, queue: asyncio.Queue[_Item]) -> None:
        while True:
            items = [await queue.get()]
            while not queue.empty():  # what the app queued meanwhile goes out together
                items.append(queue.get_nowait())
            calls: list[SemanticCall] = []
            for item in items:
                if item[0] == "call":
                    calls.append(item[1])
                    continue
                if item[0] == "get" and any(item[1].producer is c for c in calls):
                    self._fetch_early(item[1], item[2])
                    continue
                if item[0] == "set" and item[1].id not in self._known:
                    continue  # its value travels inline with the calls that use it
                await self._send_calls(calls)
                calls = []
                await self._guarded(item)
            await self._send_calls(calls)

    async def _guarded(self, item: _Item) -> None:
        try:
            await self._process(item)
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad item must never stop the ones behind it
            log.exception("sending %s failed", item[0])

    async def _send_calls(self, calls: list[SemanticCall]) -> None:
        """Send consecutive queued calls: one alone as POST /v1/calls, more as batches."""
        while calls:
            if len(calls) == 1:
                await self._guarded(("call", calls[0]))
                return
            try:
                calls = await self._send_batch(calls)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sending a batch of %d calls failed", len(calls))
                return

    async def _process(self, item: _Item) -> None:
        if item[0] == "call":
            await self._send_call(item[1])
        elif item[0] == "get":
            var, perf = item[1], item[2]
            if var.done() or var.id not in self._known:
                self._fetching.pop(var.id, None)
            else:
                self._fetching[var.id] = asyncio.get_running_loop().create_task(
                    self._fetch(var, perf)
                )
        elif item[0] == "set" and item[1].id in self._pending_remote:
            var = item[1]
            self._pending_remote.discard(var.id)
            await self._quiet("PUT", f"/v1/variables/{var.id}", SetVariable(value=var.value()))
        elif item[0] == "cancel" and item[1].id in self._known:
            await self._quiet("POST", f"/v1/variables/{item[1].id}/cancel")
        elif item[0] == "flush":
            item[1].set_result(None)

    def _unsendable(self, call: SemanticCall) -> CallError | None:
        """Why `call` must not be sent: `_CANCELLED` (cancelled before it was sent), the
        `CallError` of an input that failed here, or None."""
        if call.state is CallState.FAILED:
            return _CANCELLED
        for v in call.inputs:
            if v.id not in self._known and v.done() and v.error is not None:
                err = CallError(f"{call.function_name}#{call.id}: input {v.name!r} failed")
                err.__cause__ = v.error
                return err
        return None

    async def _send_call(self, call: SemanticCall) -> None:
        err = self._unsendable(call)
        if err is not None:
            if err is not _CANCELLED:
                self._fail_call(call, err)
            return
        req = encode_call(call, self._known)
        try:
            accepted = await self._request("POST", "/v1/calls", req, type_=CallAccepted)
        except (ParrotError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._refused(call, exc)
            return
        self._accepted(call, req, accepted)

    def _accepted(self, call: SemanticCall, req: SubmitCall, accepted: CallAccepted) -> None:
        """The service took `call` (sent as `req`): remember what it now knows."""
        self._call_ids[accepted.call_id] = call.id
        outputs = {v.id for v in call.outputs}
        for nv in req.variables:
            self._known.add(nv.id)
            if nv.value is None and nv.id not in outputs:
                self._pending_remote.add(nv.id)  # the service waits for our set()
        self._known.update(outputs)

    async def _send_batch(self, calls: list[SemanticCall]) -> list[SemanticCall]:
        """POST one batch from the front of `calls` (at most `BATCH_CALLS` calls and about
        `BATCH_BYTES` of JSON) and return the calls still to send: the rest, and those
        after a refused call (the service did not try them). A refused call fails here."""
        known = set(self._known)  # as the service will know them after the earlier calls
        sent: list[tuple[SemanticCall, SubmitCall]] = []
        size = 0
        rest = list(calls)
        while rest and len(sent) < BATCH_CALLS and size < BATCH_BYTES:
            call = rest.pop(0)
            err = self._unsendable(call)
            if err is not None:
                if err is not _CANCELLED:
                    self._fail_call(call, err)
                continue
            req = encode_call(call, known)
            size += len(msgspec.json.encode(req))
            known.update(nv.id for nv in req.variables)
            known.update(v.id for v in call.outputs)
            sent.append((call, req))
        if not sent:
            return rest
        try:
            answer = await self._request(
                "POST",
                "/v1/calls/batch",
                SubmitCalls(calls=[r for _, r in sent]),
                type_=CallsAccepted,
            )
        except (ParrotError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            for call, _ in sent:
                self._refused(call, exc)
            return rest
        for (call, req), accepted in zip(sent, answer.accepted):
            self._accepted(call, req, accepted)
        taken = len(answer.accepted)
        if answer.error is not None and taken < len(sent):
            self._refused(sent[taken][0], exception_from(answer.error))
            return [c for c, _ in sent[taken + 1 :]] + rest
        return rest

    def _refused(self, call: SemanticCall, exc: BaseException) -> None:
        """`call` did not reach the graph: it fails with `CallError` chained to `exc`."""
        err = CallError(f"{call.function_name}#{call.id}: the service refused it: {exc}")
        err.__cause__ = exc
        self._fail_call(call, err)

    def _fail_call(self, call: SemanticCall, err: CallError) -> None:
        advance(call, CallState.FAILED)
        for out in call.outputs:
            early = self._fetching.pop(out.id, None)
            if early is not None:
                early.cancel()  # a GET sent beside a batch that did not take the call
            out.fail(err)

    def _fetch_early(self, var: Variable, perf: str) -> None:
        """Wait for `var`, whose call goes out in the batch being sent now, with a GET sent
        beside that batch (`created_within`: the service waits for the batch to create it), so
        the wait costs no round trip after the submission's."""
        if var.done() or self._fetching.get(var.id) is not None:
            return
        self._fetching[var.id] = asyncio.get_running_loop().create_task(
            self._fetch(var, perf, created_within=EARLY_GET_S)
        )

    async def _fetch(self, var: Variable, perf: str, created_within: float = 0.0) -> None:
        try:
            while True:
                params = {"perf": perf, "timeout": str(self.get_timeout_s)}
                if created_within:
                    params["created_within"] = str(created_within)
                try:
                    state = await self._request(
                        "GET",
                        f"/v1/variables/{var.id}",
                        type_=VariableState,
                        params=params,
                        timeout=self.get_timeout_s + self.request_timeout_s + created_within,
                    )
                except GetTimeoutError:
                    created_within = 0.0  # it exists now
                    continue  # a long wait: ask again
                except NotFoundError:
                    if not created_within:
                        raise
                    if var.done():
                        return  # cancelled here before its batch went out: nothing to wait for
                    # The batch creating it is still on its way (or was refused: then
                    # `_fail_call` cancels this task); ask again once it is known.
                    created_within = 0.0 if var.id in self._known else created_within
                    continue
                if state.state != "pending":
                    self._apply(var, state)
                    return
        except asyncio.CancelledError:
            raise
        except (ParrotError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            err = CallError(f"getting {var.name!r} from the service failed: {exc}")
            err.__cause__ = exc
            var.fail(err)
        finally:
            self._fetching.pop(var.id, None)

    def _apply(self, var: Variable, state: VariableState) -> None:
        touched = [var]
        for vid, value in state.resolved.items():
            other = self._vars.get(vid)
            if other is not None:
                self._pending_remote.discard(vid)
                other.resolve(value)
                touched.append(other)
        if state.state == "done":
            var.resolve(state.value or "")
        elif state.state == "failed" and state.error is not None:
            var.fail(exception_from(state.error))
        for call in {v.producer for v in touched if v.producer is not None}:
            # Mirror the calls' ends, as embedded: a call is over once its outputs settled.
            if not finished(call) and all(o.done() for o in call.outputs):
                failed = any(o.error is not None for o in call.outputs)
                advance(call, CallState.FAILED if failed else CallState.DONE)

    async def flush(self) -> None:
        """Wait until everything submitted so far has been sent (and answered)."""
        if self._queue is None:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(("flush", fut))
        await fut

    # ---- HTTP -------------------------------------------------------------------------------

    @overload
    async def _request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        type_: type[T],
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> T: ...

    @overload
    async def _request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        type_: None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> None: ...

    async def _request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        type_: type[T] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> T | None:
        """`body` (a msgspec struct, or None) as JSON; the answer decoded as `type_` (None: not
        decoded). Raises the service's typed error for a 4xx/5xx answer, `TemplateError` when
        not started."""
        self.requests_sent += 1
        data = msgspec.json.encode(body) if body is not None else None
        headers = {**self._key, **self._auth}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self._http is None:
            raise TemplateError("the remote runtime is not started: use `async with`")
        async with self._http.request(
            method,
            self.url + path,
            data=data,
            headers=headers,
            params=params,
            timeout=aiohttp.ClientTimeout(total=timeout or self.request_timeout_s),
        ) as resp:
            raw = await resp.read()
            status = resp.status
        if status >= 400:
            raise error_from_response(status, raw)
        return msgspec.json.decode(raw, type=type_) if type_ is not None else None

    async def _quiet(self, method: str, path: str, body: object | None = None) -> None:
        try:
            await self._request(method, path, body)
        except (ParrotError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("%s %s failed: %s", method, path, exc)

    # ---- introspection ---------------------------------------------------------------------

    def set_api_key(self, api_key: str | None) -> None:
        """Send `api_key` as `X-Api-Key` from now on (None: none)."""
        self._key = {"X-Api-Key": api_key} if api_key else {}

    async def call_log(self) -> list[tuple[str, int, str]]:
        """The service's scheduling events for this session's calls (see `CallEvents`), with
        this client's call ids (`var.producer.id`), after everything queued here was sent."""
        await self.flush()
        got = await self._request("GET", "/v1/events", type_=CallEvents)
        return [(ev, self._call_ids.get(cid, -1), detail) for ev, cid, detail in got.events]

    async def stats(self) -> SessionStats:
        """This session's own counters (calls by state, prompt and generated tokens), after
        everything queued here was sent; nothing about other sessions or the engines (those
        are on the service's /metrics). A coroutine, unlike the embedded `Runtime.stats()`:
        `stats = await rt.stats()`."""
        await self.flush()
        return await self._request("GET", "/v1/stats", type_=SessionStats)
