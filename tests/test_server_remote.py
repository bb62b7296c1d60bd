"""`pa.Runtime.connect(url)` behaves like the embedded runtime: the runtime tests, remote.

One service per module (EchoEngine, on its own loop in a thread); every test compares with the
embedded runtime or with exact expected values.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

import parrot_actors as pa
from parrot_actors.engines.echo import EchoEngine
from parrot_actors.server import BackgroundServer, ServerConfig
from parrot_actors.server import client as client_module


@pa.semantic_function(max_tokens=40)
def step(prev: pa.Input, out: pa.Output):
    """Continue: {{prev}} Next: {{out}}"""


@pa.semantic_function(max_tokens=40)
def two_outputs(topic: pa.Input, title: pa.Output, body: pa.Output(max_tokens=30)):
    """Topic {{topic}}. Title: {{title}} Body: {{body}}"""


@pa.semantic_function(max_tokens=40)
def braces(prev: pa.Input, style: str, out: pa.Output):
    """Format {{style}} as JSON {"k": {{prev}}}
    Out: {{out}}"""


ENGINE = EchoEngine(max_len=120, delay_s=0.01)


def echo(prev: str) -> str:
    """What EchoEngine answers to `step(prev)`."""
    return f"echo({f'Continue: {prev} Next: '[-12:]})"


@pytest.fixture(scope="module")
def server():
    with BackgroundServer([ENGINE], ServerConfig(port=0)) as srv:
        yield srv


class RequestLog:
    """Counts HTTP requests by (method, path) through an aiohttp trace."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_start.append(self._on_start)

    async def _on_start(self, session, ctx, params) -> None:
        self.requests.append((params.method, params.url.path))

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))


async def run_chain(depth: int, rt_factory) -> tuple[list[str], object]:
    async with rt_factory() as rt:
        vars_ = [step(pa.Variable("seed"))]
        for _ in range(depth - 1):
            vars_.append(step(vars_[-1]))
        last = await vars_[-1]
        return [v.value() for v in vars_[:-1]] + [last], rt


@pytest.mark.parametrize("depth", [2, 8])
async def test_chain_costs_one_submission_and_one_get(server, depth):
    log = RequestLog()
    remote, _ = await run_chain(
        depth, lambda: pa.Runtime.connect(server.url, trace_configs=[log.trace])
    )
    embedded, _ = await run_chain(depth, lambda: pa.Runtime(engines=[EchoEngine()]))
    # Same values at every step, intermediate ones included (they ride along with the GET).
    assert remote == embedded
    # The whole chain was built before the first await: one batch carries every call.
    assert log.requests[:2] == [("POST", "/v1/sessions"), ("POST", "/v1/calls/batch")]
    assert log.requests[2][0] == "GET" and log.requests[2][1].startswith("/v1/variables/")
    assert log.requests[3:] == [("DELETE", "/v1/session")]


async def test_a_refused_call_in_a_batch_fails_alone_and_the_rest_is_resent():
    with BackgroundServer([EchoEngine()], ServerConfig(port=0, max_pending_calls=2)) as srv:
        log = RequestLog()
        async with pa.Runtime.connect(srv.url, trace_configs=[log.trace]):
            outs = [step(pa.Variable(t)) for t in ("a", "b", "c", "d")]
            got = await asyncio.gather(*outs, return_exceptions=True)
    # a and b were taken (pending until awaited); c was refused, which ended the batch; d
    # went again on its own and was refused for the same reason.
    assert got[:2] == [echo("a"), echo("b")]
    for err in got[2:]:
        assert isinstance(err, pa.CallError) and "the service refused it" in str(err)
        assert type(err.__cause__).__name__ == "TooManyPendingError"
    posts = [p for m, p in log.requests if m == "POST"]
    assert posts == ["/v1/sessions", "/v1/calls/batch", "/v1/calls"]


async def test_calls_are_lazy_until_awaited_and_objective_travels(server):
    async with pa.Runtime.connect(server.url) as rt:
        before = len(ENGINE.log)
        out = step(pa.Variable("lazy"))
        await rt.flush()  # the call reached the service
        await asyncio.sleep(0.05)
        assert len(ENGINE.log) == before and not out.done()
        # Finished calls leave the runtime's table, so take the pending one now.
        (call,) = [
            c
            for c in server.runtime.calls.values()
            if c.outputs[0].name == "step.out" and not c.outputs[0].done()
        ]
        assert await out.get(perf=pa.THROUGHPUT) == echo("lazy")
        assert call.outputs[0].value() == echo("lazy")
        assert call.objective == pa.THROUGHPUT


async def test_several_outputs_and_brace_text_match_embedded(server):
    async def app():
        title, body = two_outputs(pa.Variable("cats"))
        shaped = braces(pa.Variable("{x}"), "{{name}}")
        return [await body, title.value(), await shaped]

    async with pa.Runtime.connect(server.url):
        remote = await app()
    async with pa.Runtime(engines=[EchoEngine()]):
        embedded = await app()
    assert remote == embedded
    assert remote[0] == f"echo({remote[1][-5:]} Body: )"
    assert remote[2] == "echo(: {x}}\nOut: )"


def cause_chain(err: BaseException) -> list[str]:
    chain = []
    while err is not None:
        chain.append(type(err).__name__)
        err = err.__cause__
    return chain


async def test_failure_propagates_with_typed_cause_chain(server):
    async with pa.Runtime.connect(server.url):
        bad = step(pa.Variable("y" * 150))  # beyond the engine's maximum length
        after = step(bad)
        last = step(after)
        good = step(step(pa.Variable("fine")))
        with pytest.raises(pa.CallError) as info:
            await last
        assert cause_chain(info.value) == [
            "CallError",
            "CallError",
            "CallError",
            "InvalidRequestError",
        ]
        assert "maximum length is 120" in str(info.value.__cause__.__cause__.__cause__)
        with pytest.raises(pa.CallError, match="input 'step.out' failed"):
            await after
        assert (await good).startswith("echo(")


async def test_sampling_the_service_refuses_fails_like_embedded(server):
    @pa.semantic_function(top_p=5.0)
    def odd(x: pa.Input, y: pa.Output):
        """Q {{x}} A {{y}}"""

    chains = []
    for factory in (
        lambda: pa.Runtime.connect(server.url),
        lambda: pa.Runtime(engines=[EchoEngine()]),
    ):
        async with factory():
            with pytest.raises(pa.CallError) as info:
                await odd(pa.Variable("q"))
            chains.append(cause_chain(info.value))
            assert "top_p=5.0: must be in (0, 1]" in str(info.value)
    assert chains[0][0] == chains[1][0] == "CallError"
    assert chains[0][-1] == chains[1][-1] == "InvalidRequestError"


async def test_variable_rules_hold_remotely(server):
    async with pa.Runtime.connect(server.url):
        v = pa.Variable(name="v")
        v.set("one")
        with pytest.raises(pa.VariableError, match="already set"):
            v.set("two")
        out = step(v)
        with pytest.raises(pa.VariableError, match="produced by a call"):
            out.set("x")
        with pytest.raises(pa.CallError, match="already has a producer"):
            step(pa.Variable("z"), out=out)
        assert await pa.gather(out, step(pa.Variable("k"))) == [
            echo("one"),
            echo("k"),
        ]


async def test_cycle_is_rejected_at_submission(server):
    async with pa.Runtime.connect(server.url):
        loop_var = pa.Variable(name="loop")
        with pytest.raises(pa.CallError, match="cycle"):
            step(loop_var, out=loop_var)
        pending_out = pa.Variable(name="later")
        mid = step(pending_out)
        with pytest.raises(pa.CallError, match="cycle"):
            step(mid, out=pending_out)
        assert await step(pa.Variable("a")) == echo("a")


async def test_cancel_makes_downstream_raise_and_frees_contexts(server):
    slow = EchoEngine(name="slow", model_name="slow", delay_s=0.5)

    @pa.semantic_function(model="slow")
    def slow_step(prev: pa.Input, out: pa.Output):
        """Go {{prev}} Next: {{out}}"""

    with BackgroundServer([slow]) as srv:
        async with pa.Runtime.connect(srv.url):
            a = slow_step(pa.Variable("a"))
            b = slow_step(a)
            task = asyncio.ensure_future(b.get())
            for _ in range(100):
                if slow.contexts:
                    break
                await asyncio.sleep(0.01)
            assert len(slow.contexts) == 1  # a is running
            assert a.cancel() is True
            with pytest.raises(pa.CallError, match="input 'slow_step.out' failed") as info:
                await task
            assert "was cancelled" in str(info.value.__cause__)
            with pytest.raises(pa.CallError, match="was cancelled"):
                await a
            assert a.cancel() is False
            await asyncio.sleep(0.05)
            assert slow.contexts == {}


async def test_setting_a_variable_later_sends_one_put(server):
    log = RequestLog()
    async with pa.Runtime.connect(server.url, trace_configs=[log.trace]):
        src = pa.Variable(name="later")
        out = step(src)
        waiter = asyncio.ensure_future(out.get())
        await asyncio.sleep(0.05)
        assert not out.done()
        src.set("now")
        assert (await waiter) == echo("now")
    assert log.count("PUT", "/v1/variables") == 1
    assert log.count("POST", "/v1/calls") == 1


async def test_unknown_model_fails_clearly(server):
    @pa.semantic_function(model="llama-70b")
    def big(x: pa.Input, y: pa.Output):
        """Q {{x}} A {{y}}"""

    async with pa.Runtime.connect(server.url):
        with pytest.raises(pa.CallError, match="needs model 'llama-70b'.*'echo'"):
            await big(pa.Variable("q"))


async def test_stats_is_a_coroutine_with_the_sessions_own_counters(server):
    async with pa.Runtime.connect(server.url) as rt:
        before = await rt.stats()
        await step(pa.Variable("count me"))
        after = await rt.stats()
        async with pa.Runtime.connect(server.url) as other:
            # Another session's work never shows in this one's counters, and vice versa.
            await step(pa.Variable("someone else"))
            assert await rt.stats() == after
            mine = await other.stats()
    assert (before.calls_submitted, before.calls_completed, before.generated_tokens) == (0, 0, 0)
    assert (after.calls_submitted, after.calls_completed, after.calls_pending) == (1, 1, 0)
    assert after.generated_tokens == len(echo("count me"))
    assert after.prompt_tokens > 0 and not hasattr(after, "engines")
    assert (mine.calls_completed, mine.generated_tokens) == (1, len(echo("someone else")))
    assert mine.session_id != after.session_id


async def test_closing_the_runtime_fails_pending_variables(server):
    async with pa.Runtime.connect(server.url):
        src = pa.Variable(name="never")
        out = step(src)
    with pytest.raises(pa.CallError, match="remote runtime was closed"):
        await out


async def test_a_wait_sent_beside_a_call_cancelled_before_it_left_ends(server, monkeypatch):
    monkeypatch.setattr(client_module, "EARLY_GET_S", 0.2)
    monkeypatch.setattr(client_module, "BATCH_CALLS", 1)  # one call per batch, in turn
    log = RequestLog()
    async with pa.Runtime.connect(server.url, trace_configs=[log.trace]) as rt:
        first, second = step(pa.Variable("x")), step(pa.Variable("y"))
        rt.on_demand(second, "latency")  # awaited: its GET goes beside the batches
        await asyncio.sleep(0)  # the first batch is on its way, the GET too
        assert rt._fetching.get(second.id) is not None
        assert second.cancel() is True  # cancelled before its own batch went out
        await asyncio.sleep(1.0)
        # Only the first call left; the second's GET got 404 once the 0.2 s grace was over
        # and stopped (it does not ask every 0.2 s for a variable nobody will create).
        assert log.count("POST", "/v1/calls") == 1
        assert log.count("GET", "/v1/variables/") == 1
        assert rt._fetching == {}
        assert await first == echo("x")  # the session serves on
