"""The runtime on a fake echo engine: dependent calls, laziness, failures, cancellation."""

from __future__ import annotations

import asyncio

import pytest

import parrot_actors as pa
from parrot_actors.engines.echo import EchoEngine


@pa.semantic_function(max_tokens=40)
def step(prev: pa.Input, out: pa.Output):
    """Continue: {{prev}} Next: {{out}}"""


@pa.semantic_function(max_tokens=40)
def two_outputs(topic: pa.Input, title: pa.Output, body: pa.Output(max_tokens=30)):
    """Topic {{topic}}. Title: {{title}} Body: {{body}}"""


def log_index(log, event, call_id):
    return next(i for i, e in enumerate(log) if e[0] == event and e[1] == call_id)


async def test_chain_runs_without_client_round_trips():
    engine = EchoEngine()
    async with pa.Runtime(engines=[engine]) as rt:
        a = step(pa.Variable("seed"))
        b = step(a)
        c = step(b)
        value = await c  # the app awaits only the last variable
        log = rt.scheduler.event_log
        ids = [a.producer.id, b.producer.id, c.producer.id]
        # B was dispatched by the runtime when A's output resolved, C when B's did.
        assert log_index(log, "resolved", ids[0]) < log_index(log, "ready", ids[1])
        assert log_index(log, "ready", ids[1]) < log_index(log, "dispatch", ids[1])
        assert log_index(log, "resolved", ids[1]) < log_index(log, "dispatch", ids[2])
        assert log_index(log, "dispatch", ids[1]) > log_index(log, "dispatch", ids[0])
        assert [e[0] for e in engine.log] == ["fill", "generate", "free"] * 3
        # Each prompt holds the previous output verbatim: the frontend adds nothing.
        assert engine.log[3][2] == f"Continue: {a.value()} Next: "
        assert value == f"echo({engine.log[6][2][-12:]})"
        assert rt.stats().calls_completed == 3


async def test_lazy_calls_wait_until_asked_and_eager_does_not():
    engine = EchoEngine()
    async with pa.Runtime(engines=[engine]):
        out = step(pa.Variable("x"))
        await asyncio.sleep(0.01)
        assert engine.log == [] and not out.done()
        assert (await out.get(perf=pa.THROUGHPUT)).startswith("echo(")
        assert out.producer.objective == pa.THROUGHPUT
    eager_engine = EchoEngine()
    async with pa.Runtime(engines=[eager_engine], eager=True):
        out = step(pa.Variable("x"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert out.done()


async def test_several_outputs_in_one_context():
    engine = EchoEngine()
    async with pa.Runtime(engines=[engine]):
        title, body = two_outputs(pa.Variable("cats"))
        assert await body == f"echo({(await title)[-5:]} Body: )"
        contexts = {e[1] for e in engine.log}
        assert len(contexts) == 1
        assert [e[0] for e in engine.log] == ["fill", "generate", "fill", "generate", "free"]


async def test_failure_propagates_downstream_and_others_finish():
    engine = EchoEngine(max_len=60)
    async with pa.Runtime(engines=[engine]):
        bad = step(pa.Variable("y" * 80))  # beyond the engine's maximum length
        after = step(bad)
        last = step(after)
        good = step(step(pa.Variable("fine")))
        with pytest.raises(pa.CallError) as info:
            await last
        chain = []
        err: BaseException | None = info.value
        while err is not None:
            chain.append(type(err).__name__)
            err = err.__cause__
        assert chain[-1] == "InvalidRequestError" and chain[0] == "CallError"
        with pytest.raises(pa.CallError):
            await after
        assert (await good).startswith("echo(")


async def test_variable_rules():
    v = pa.Variable(name="v")
    v.set("one")
    with pytest.raises(pa.VariableError, match="already set"):
        v.set("two")
    engine = EchoEngine()
    async with pa.Runtime(engines=[engine]):
        out = step(v)
        with pytest.raises(pa.VariableError, match="produced by a call"):
            out.set("x")
        with pytest.raises(pa.CallError, match="already has a producer"):
            step(pa.Variable("z"), out=out)
        assert await pa.gather(out, step(pa.Variable("k"))) == [
            out.value(),
            await step(pa.Variable("k")),
        ]


async def test_cycle_is_rejected_at_submission():
    engine = EchoEngine()
    async with pa.Runtime(engines=[engine]):
        loop_var = pa.Variable(name="loop")
        with pytest.raises(pa.CallError, match="cycle"):
            step(loop_var, out=loop_var)
        first = step(pa.Variable("a"))
        pending_out = pa.Variable(name="later")
        mid = step(pending_out)
        with pytest.raises(pa.CallError, match="cycle"):
            step(mid, out=pending_out)
        assert (await first).startswith("echo(")


async def test_cancel_makes_downstream_raise():
    engine = EchoEngine(delay_s=0.5)
    async with pa.Runtime(engines=[engine]):
        a = step(pa.Variable("a"))
        b = step(a)
        task = asyncio.ensure_future(b.get())
        await asyncio.sleep(0.05)
        assert a.cancel() is True
        with pytest.raises(pa.CallError, match="input 'step.out' failed") as info:
            await task
        assert "was cancelled" in str(info.value.__cause__)
        with pytest.raises(pa.CallError, match="was cancelled"):
            await a
        assert a.cancel() is False
    assert engine.contexts == {}


async def test_waiting_on_a_set_variable_chain():
    engine = EchoEngine()
    async with pa.Runtime(engines=[engine]):
        src = pa.Variable(name="later")
        out = step(src)
        waiter = asyncio.ensure_future(out.get())
        await asyncio.sleep(0.01)
        assert engine.log == []
        src.set("now")
        assert (await waiter) == "echo(: now Next: )"


async def test_unknown_model_fails_clearly():
    @pa.semantic_function(model="llama-70b")
    def big(x: pa.Input, y: pa.Output):
        """Q {{x}} A {{y}}"""

    async with pa.Runtime(engines=[EchoEngine()]):
        with pytest.raises(pa.CallError, match="needs model 'llama-70b'.*'echo'"):
            await big(pa.Variable("q"))


@pa.semantic_function(max_tokens=40, chat=True)
def chat_step(prev: pa.Input, out: pa.Output):
    """Reply to: {{prev}}{{out}}"""


async def test_chat_wraps_the_prompt_as_one_user_message():
    engine = EchoEngine()
    async with pa.Runtime(engines=[engine]):
        assert await chat_step(pa.Variable("hi")) == "echo(><assistant>)"
        assert engine.log[0] == ("fill", engine.log[0][1], "<user>Reply to: hi</user><assistant>")
