"""Sessions and bad input: isolation, tokens, teardown frees KV, limits, 4xx JSON errors,
/health and /metrics."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from parrot_actors.engines.echo import EchoEngine
from parrot_actors.server import BackgroundServer, ServerConfig

FAST = EchoEngine(name="echo0", delay_s=0.01)
SLOW = EchoEngine(name="slow", model_name="slow", delay_s=5.0)
CONFIG = ServerConfig(port=0, max_pending_calls=4, max_body_bytes=64 << 10, reap_interval_s=0.05)


@pytest.fixture(scope="module")
def server():
    with BackgroundServer([FAST, SLOW], CONFIG) as srv:
        yield srv


@pytest.fixture
async def http(server):
    async with aiohttp.ClientSession(server.url) as session:
        yield session


async def api(http, method, path, token=None, **kw) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, path, headers=headers, **kw) as r:
        assert r.content_type == "application/json", await r.text()
        return r.status, await r.json()


async def new_session(http, **body) -> str:
    status, data = await api(http, "POST", "/v1/sessions", json=body)
    assert status == 201
    return data["token"]


def call(template: str, **args) -> dict:
    return {"template": template, "args": args}


SLOW_CALL = {**call("Go {{input:x}} {{output:y}}", x={"value": "a"}, y={}), "model": "slow"}


async def wait_for(cond, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_every_parrot_call_needs_a_live_token(http):
    for method, path in [
        ("POST", "/v1/calls"),
        ("GET", "/v1/variables/v1"),
        ("PUT", "/v1/variables/v1"),
        ("GET", "/v1/stats"),
        ("DELETE", "/v1/session"),
    ]:
        status, data = await api(http, method, path)
        assert (status, data["error"]["type"]) == (401, "UnauthorizedError")
        status, data = await api(http, method, path, token="not-a-session")
        assert status == 401 and "unknown or expired" in data["error"]["message"]


async def test_sessions_see_only_their_own_variables(http):
    a, b = await new_session(http), await new_session(http)
    assert (await api(http, "POST", "/v1/variables", a, json={"id": "x1"}))[0] == 201
    status, sub = await api(
        http,
        "POST",
        "/v1/calls",
        a,
        json=call("Say {{input:p}} {{output:q}}", p={"var": "x1"}, q={}),
    )
    q = sub["outputs"]["q"]
    for method, path, body in [
        ("GET", f"/v1/variables/{q}?timeout=0", None),
        ("PUT", "/v1/variables/x1", {"value": "from b"}),
        ("POST", "/v1/variables/x1/cancel", None),
        ("GET", f"/v1/variables/{q}/stream", None),
        ("POST", "/v1/calls", call("Read {{input:p}} {{output:r}}", p={"var": "x1"}, r={})),
    ]:
        status, data = await api(http, method, path, b, json=body)
        assert status == 404, (method, path)
        assert data["error"]["type"] == "NotFoundError"
        assert "does not exist in this session" in data["error"]["message"]
    # The same id is free in B and means a different variable there.
    assert (await api(http, "POST", "/v1/variables", b, json={"id": "x1", "value": "b"}))[0] == 201
    assert (await api(http, "GET", "/v1/variables/x1?timeout=0", a))[1]["state"] == "pending"
    assert (await api(http, "PUT", "/v1/variables/x1", a, json={"value": "mine"}))[0] == 200
    status, data = await api(http, "GET", f"/v1/variables/{q}?timeout=5", a)
    assert (status, data["value"]) == (200, "echo(Say mine )")
    assert data["resolved"] == {}  # x1 was set by A: nothing new to tell it
    for token in (a, b):
        assert (await api(http, "DELETE", "/v1/session", token))[0] == 200


async def test_deleting_a_session_cancels_its_calls_and_frees_kv(http):
    token = await new_session(http)
    status, sub = await api(http, "POST", "/v1/calls", token, json=SLOW_CALL)
    y = sub["outputs"]["y"]
    assert (await api(http, "GET", f"/v1/variables/{y}?timeout=0", token))[1]["state"] == "pending"
    await wait_for(lambda: SLOW.stats().kv_blocks_used == 1)  # running, holding its context
    t0 = time.monotonic()
    status, closed = await api(http, "DELETE", "/v1/session", token)
    assert status == 200
    assert (closed["cancelled_calls"], closed["freed_variables"]) == (1, 1)
    assert time.monotonic() - t0 < 2.0  # cancelled, not waited out (the call takes 5 s)
    assert SLOW.stats().kv_blocks_used == 0 and SLOW.contexts == {}
    assert (await api(http, "GET", f"/v1/variables/{y}", token))[0] == 401


async def test_an_idle_session_expires_and_frees_kv(http):
    token = await new_session(http, ttl_s=0.3)
    _, sub = await api(http, "POST", "/v1/calls", token, json=SLOW_CALL)
    await api(http, "GET", f"/v1/variables/{sub['outputs']['y']}?timeout=0", token)
    await wait_for(lambda: SLOW.stats().kv_blocks_used == 1)
    await wait_for(lambda: SLOW.stats().kv_blocks_used == 0)
    status, data = await api(http, "GET", "/v1/stats", token)
    assert status == 401


async def test_pending_calls_per_session_are_limited(http):
    token, other = await new_session(http), await new_session(http)
    lazy = call("Hi {{input:x}} {{output:y}}", x={"value": "a"}, y={})
    for _ in range(CONFIG.max_pending_calls):
        assert (await api(http, "POST", "/v1/calls", token, json=lazy))[0] == 201
    status, data = await api(http, "POST", "/v1/calls", token, json=lazy)
    assert (status, data["error"]["type"]) == (429, "TooManyPendingError")
    assert (await api(http, "POST", "/v1/calls", other, json=lazy))[0] == 201  # others unaffected
    for t in (token, other):
        await api(http, "DELETE", "/v1/session", t)


BAD_INPUT = [
    # (method, path, body bytes or JSON, status, error type, words the message must contain)
    ("POST", "/v1/calls", b'{"template": ', 400, "BadRequestError", "malformed JSON"),
    ("POST", "/v1/calls", {"template": 3}, 400, "BadRequestError", "`$.template`"),
    ("POST", "/v1/calls", {"template": "x", "foo": 1}, 400, "BadRequestError", "`foo`"),
    ("POST", "/v1/calls", b"[1, 2]", 400, "BadRequestError", "Expected `object`"),
    (
        "POST",
        "/v1/calls",
        call("A {{output:y}}{{output:z}}", y={}, z={}),
        422,
        "TemplateError",
        "no text between",
    ),
    ("POST", "/v1/calls", call("A {{oops:y}}", y={}), 422, "TemplateError", "unknown direction"),
    (
        "POST",
        "/v1/calls",
        call("A {{input:x}} B", x={"value": "1"}),
        422,
        "TemplateError",
        "no output",
    ),
    (
        "POST",
        "/v1/calls",
        call("A {{x}} {{output:y}}", x={"var": "nope"}, y={}),
        404,
        "NotFoundError",
        "'nope'",
    ),
    (
        "POST",
        "/v1/calls",
        call("A {{output:y}}", y={"value": "v"}),
        400,
        "BadRequestError",
        "not `value`",
    ),
    (
        "POST",
        "/v1/calls",
        call("A {{output:y}}", y={"sampling": {"top_k": -1}}),
        400,
        "InvalidRequestError",
        "top_k=-1",
    ),
    (
        "POST",
        "/v1/calls",
        call("A {{output:y}}", y={"sampling": {"seed": 1 << 64}}),
        400,
        "BadRequestError",
        "sampling.seed",
    ),
    ("POST", "/v1/calls", {"template": "x" * (70 << 10)}, 413, "PayloadTooLargeError", "limit"),
    ("GET", "/v1/variables/given?perf=fast", None, 400, "BadRequestError", "perf='fast'"),
    ("GET", "/v1/variables/given?timeout=-1", None, 400, "BadRequestError", "timeout='-1'"),
    ("GET", "/v1/variables/pending?timeout=0.05", None, 504, "GetTimeoutError", "still pending"),
    ("PUT", "/v1/variables/given", {"value": "again"}, 409, "VariableError", "already set"),
    ("POST", "/v1/variables", {"id": "given"}, 409, "ConflictError", "already in use"),
    ("POST", "/v1/variables", {"id": "bad id"}, 400, "BadRequestError", "`$.id`"),
    ("GET", "/v1/nowhere", None, 404, "NotFoundError", "no route"),
    ("PATCH", "/v1/calls", None, 405, "HTTPMethodNotAllowed", ""),
]


@pytest.mark.parametrize("method,path,body,status,etype,words", BAD_INPUT)
async def test_bad_input_is_a_4xx_json_error_naming_the_problem(
    http, method, path, body, status, etype, words
):
    token = await new_session(http)
    await api(http, "POST", "/v1/variables", token, json={"id": "given", "value": "v"})
    await api(http, "POST", "/v1/variables", token, json={"id": "pending"})
    kw = {"data": body} if isinstance(body, bytes) else {"json": body}
    got, data = await api(http, method, path, token, **kw)
    assert (got, data["error"]["type"]) == (status, etype)
    assert words in data["error"]["message"]
    await api(http, "DELETE", "/v1/session", token)


async def test_health_and_metrics(http):
    status, health = await api(http, "GET", "/health")
    assert status == 200
    assert health == {
        "status": "ok",
        "engines": 2,
        "sessions": 0,
        "models": ["echo", "slow"],
        "unhealthy": {},
    }

    async def scrape() -> str:
        async with http.get("/metrics") as r:
            assert r.status == 200 and r.content_type == "text/plain"
            return await r.text()

    def value(text: str, sample: str) -> float:
        m = re.search(re.escape(sample) + r" ([0-9.e+]+)\n", text)
        return float(m.group(1)) if m else 0.0

    health_ok = 'parrot_http_requests_total{method="GET",route="/health",status="200"}'
    before = value(await scrape(), health_ok)
    for _ in range(3):
        await api(http, "GET", "/health")
    text = await scrape()
    assert value(text, health_ok) == before + 3
    assert value(text, 'parrot_engine_kv_blocks_used{engine="slow"}') == 0.0
    assert value(text, 'parrot_engine_kv_blocks_total{engine="echo0"}') == float(1 << 20)
    assert value(text, 'parrot_engine_up{engine="echo0"}') == 1.0
    assert 'parrot_engine_restarts_total{engine="slow"} 0.0' in text
    assert value(text, "parrot_sessions") == 0.0
    assert value(text, "parrot_scheduler_ready_calls") == 0.0
    assert 'parrot_http_request_seconds_bucket{le="0.005",route="/health"}' in text
    assert "parrot_variable_wait_seconds_count" in text


async def test_a_get_sent_beside_the_call_waits_for_its_variable_to_exist(http):
    token = await new_session(http)
    early = asyncio.ensure_future(
        api(http, "GET", "/v1/variables/out1?timeout=5&created_within=5", token)
    )
    await asyncio.sleep(0.1)  # the GET arrives first
    body = call("Say {{input:p}} {{output:out1}}", p={"value": "hi"}, out1={})
    body["args"]["out1"] = {"var": "out1"}
    status, sub = await api(http, "POST", "/v1/calls", token, json=body)
    assert status == 201 and sub["outputs"] == {"out1": "out1"}
    status, data = await early
    assert (status, data["state"], data["value"]) == (200, "done", "echo(Say hi )")
    # Never created: 404 once the grace is over; a grace past the limit is a 400.
    status, data = await api(http, "GET", "/v1/variables/never?created_within=0.05", token)
    assert (status, data["error"]["type"]) == (404, "NotFoundError")
    status, data = await api(http, "GET", "/v1/variables/never?created_within=11", token)
    assert status == 400 and "created_within='11'" in data["error"]["message"]
    assert (await api(http, "DELETE", "/v1/session", token))[0] == 200
