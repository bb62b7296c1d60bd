"""Several engines: load balance, prefix affinity, model routing, per-call stats."""

from __future__ import annotations

import pytest

import parrot_actors as pa
from parrot_actors.engines.echo import EchoEngine


@pa.semantic_function(max_tokens=10)
def short(x: pa.Input, y: pa.Output):
    """Q: {{x}} A: {{y}}"""


@pa.semantic_function(max_tokens=10, model="echo-b")
def on_b(x: pa.Input, y: pa.Output):
    """B: {{x}} A: {{y}}"""


@pa.semantic_function(max_tokens=10)
def with_system(x: pa.Input, y: pa.Output):
    """You are a very careful assistant with a long shared system prompt.
    Q: {{x}} A: {{y}}"""


def engines_of(rt, ids):
    return {e[1]: e[2] for e in rt.scheduler.event_log if e[0] == "dispatch" and e[1] in ids}


async def test_independent_calls_balance_across_engines():
    a, b = EchoEngine("a", delay_s=0.05), EchoEngine("b", delay_s=0.05)
    async with pa.Runtime(engines=[a, b]) as rt:
        outs = [short(pa.Variable(f"question {i}")) for i in range(8)]
        await pa.gather(*outs)
        placed = engines_of(rt, {o.producer.id for o in outs})
        assert sorted(placed.values()) == ["a"] * 4 + ["b"] * 4
        stats = rt.call_stats()
        assert len(stats) == 8 and all(s.e2e_s >= s.queue_s >= 0 for s in stats)
        assert all(s.completion_tokens == 10 and s.ttft_s > 0 for s in stats)


async def test_prefix_affinity_keeps_sharers_together():
    a, b = EchoEngine("a", delay_s=0.02), EchoEngine("b", delay_s=0.02)
    async with pa.Runtime(engines=[a, b]) as rt:
        outs = [with_system(pa.Variable(f"q{i}")) for i in range(6)]
        await pa.gather(*outs)
        placed = engines_of(rt, {o.producer.id for o in outs})
        assert len(set(placed.values())) == 1
        holder = a if placed[outs[0].producer.id] == "a" else b
        assert sum(e[0] == "fill" and e[1].startswith("prefix") for e in holder.log) == 1


async def test_model_routing_and_unknown_model():
    a, b = EchoEngine("a", model_name="echo-a"), EchoEngine("b", model_name="echo-b")
    async with pa.Runtime(engines=[a, b]) as rt:
        outs = [on_b(pa.Variable(f"x{i}")) for i in range(3)]
        await pa.gather(*outs)
        assert set(engines_of(rt, {o.producer.id for o in outs}).values()) == {"b"}
        assert not any(e[0] == "generate" for e in a.log)


class DyingEcho(EchoEngine):
    """Dies (like a lost Ray actor) on its first generate."""

    healthy = True

    async def generate(
        self, context_id, sampling=None, parent_context_id=None, priority=0, stream=False
    ):
        from parrot_actors.errors import EngineDiedError

        self.healthy = False
        self.contexts.clear()
        raise EngineDiedError(f"engine {self.name!r} died")


async def test_call_on_a_dead_engine_is_retried_elsewhere():
    dying, alive = DyingEcho("a"), EchoEngine("b")
    async with pa.Runtime(engines=[dying, alive]) as rt:
        out = short(pa.Variable("hello"))
        assert await out == "echo(Q: he"
        log = rt.scheduler.event_log
        assert [e[0] for e in log if e[1] == out.producer.id][:5] == [
            "ready",
            "dispatch",
            "retry",
            "dispatch",
            "resolved",
        ]
        assert [e[2] for e in log if e[0] == "dispatch"] == ["a", "b"]


async def test_dead_engine_fails_the_call_without_retries():
    dying, alive = DyingEcho("a"), EchoEngine("b")
    async with pa.Runtime(engines=[dying, alive], scheduler=pa.SchedulerConfig(max_retries=0)):
        with pytest.raises(pa.CallError, match="died") as info:
            await short(pa.Variable("hello"))
        assert type(info.value.__cause__).__name__ == "EngineDiedError"
        assert await short(pa.Variable("again")) == "echo(Q: ag"
