"""`RayEngine` (the scheduler's proxy of an engine actor) against a fake actor handle: typed
errors, death and rejoin, context namespacing, prefix replay after a restart. No cluster."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'parrot_actors[ray]')")

from ray.exceptions import ActorDiedError, RayTaskError  # noqa: E402

import parrot_actors as pa  # noqa: E402
from parrot_actors.engines.echo import EchoEngine  # noqa: E402
from parrot_actors.errors import ContextNotFoundError, EngineDiedError  # noqa: E402
from parrot_actors.messages import SamplingParams  # noqa: E402
from parrot_actors.ray.proxy import RayEngine  # noqa: E402
from parrot_actors.ray.wire import EngineInfo, OpResult  # noqa: E402


class FakeTokenizer:
    """Characters are tokens, as in `EchoEngine`."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


class FakeActor:
    """An `EngineActor` look-alike over an `EchoEngine`: `.method.remote(...)` returns an
    awaitable; `restart()` replaces the engine (contexts lost) like a Ray restart; while `dead`
    every call raises `ActorDiedError`, and calls in flight across a restart raise it too."""

    def __init__(self, name: str = "e0", delay_s: float = 0.0) -> None:
        self.name, self.delay_s = name, delay_s
        self.incarnation = 0
        self.dead = False
        self.engine = EchoEngine(name, delay_s=delay_s)
        self.old_logs: list[list] = []

    def restart(self) -> None:
        self.old_logs.append(self.engine.log)
        self.incarnation += 1
        self.engine = EchoEngine(self.name, delay_s=self.delay_s)

    def __getattr__(self, method: str) -> object:
        actor = self

        class Method:
            def remote(self, *args: object) -> object:
                return actor.run(method, args)

        return Method()

    async def run(self, method: str, args: tuple) -> object:
        if self.dead:
            raise ActorDiedError()
        born = self.incarnation
        inc = f"inc{born}"
        try:
            if method == "ping":
                return inc
            if method == "stats":
                value = None
            else:  # "call": the engine op named first, with its arguments
                value = await getattr(self.engine, args[0])(*args[1:])
        except pa.ParrotError as exc:
            raise RayTaskError(method, "traceback", exc).as_instanceof_cause() from None
        if self.dead or self.incarnation != born:
            raise ActorDiedError()
        return OpResult(value, inc, self.engine.stats())


def proxy_of(actor: FakeActor) -> RayEngine:
    info = EngineInfo(
        name=actor.name,
        model_name="echo",
        aliases=(),
        incarnation=f"inc{actor.incarnation}",
        stats=actor.engine.stats(),
    )
    return RayEngine(actor, info, FakeTokenizer(), probe_interval_s=0.01)


GREEDY = SamplingParams(max_tokens=20)


async def test_engine_api_and_typed_errors_pass_through():
    actor = FakeActor()
    proxy = proxy_of(actor)
    assert proxy.tokenize("ab", first=True) == [97, 98]
    fill = await proxy.fill("c1", text="hello world")
    assert (fill.appended_tokens, fill.context_len) == (11, 11)
    out = await proxy.generate("c1", GREEDY)
    assert out.text == "echo(hello world)"
    assert proxy.stats().generated_tokens == 17  # cached from the answer
    with pytest.raises(ContextNotFoundError, match="does not exist"):
        await proxy.generate("nope", GREEDY)
    await proxy.free_context("c1")
    assert actor.engine.contexts == {}


async def test_two_proxies_on_one_actor_do_not_collide():
    actor = FakeActor()
    a, b = proxy_of(actor), proxy_of(actor)
    await a.fill("call0-0", text="from a ")
    await b.fill("call0-0", text="from b ")
    assert (await a.generate("call0-0", GREEDY)).text == "echo(from a )"
    assert (await b.generate("call0-0", GREEDY)).text == "echo(from b )"
    assert len(actor.engine.contexts) == 2


async def test_death_fails_in_flight_call_and_rejoins_after_restart():
    actor = FakeActor(delay_s=0.2)
    proxy = proxy_of(actor)
    changes: list[bool] = []
    proxy.add_listener(lambda e: changes.append(e.healthy))
    await proxy.fill("c1", text="hello")
    call = asyncio.ensure_future(proxy.generate("c1", GREEDY))
    await asyncio.sleep(0.05)
    actor.dead = True
    actor.restart()
    with pytest.raises(EngineDiedError, match="died"):
        await call
    assert proxy.healthy is False and changes == [False]
    with pytest.raises(EngineDiedError, match="lost"):
        await proxy.fill("c2", text="x")  # no new work while it is down
    actor.dead = False
    for _ in range(200):
        if proxy.healthy:
            break
        await asyncio.sleep(0.01)
    assert changes == [False, True] and proxy.restarts == 1
    await proxy.free_context("c1")  # died with the old incarnation: nothing to free
    await proxy.fill("c3", text="again")
    assert (await proxy.generate("c3", GREEDY)).text == "echo(again)"
    await proxy.close()


async def test_prefix_context_is_refilled_after_a_silent_restart():
    actor = FakeActor()
    proxy = proxy_of(actor)
    prefix = proxy.tokenize("System prompt. ")
    await proxy.fill("prefix0", token_ids=prefix)
    await proxy.fill("child0", text="Q1", parent_context_id="prefix0")
    assert (await proxy.generate("child0", GREEDY)).text == "echo(m prompt. Q1)"
    actor.restart()  # between calls: no error seen, the contexts are simply gone
    await proxy.fill("child1", text="Q2", parent_context_id="prefix0")
    assert (await proxy.generate("child1", GREEDY)).text == "echo(m prompt. Q2)"
    assert proxy.restarts == 1
    refilled = [(kind, ctx.split("/")[1]) for kind, ctx, _ in actor.engine.log[:2]]
    assert refilled == [("fill", "prefix0"), ("fill", "child1")]
    with pytest.raises(EngineDiedError, match="lost when engine 'e0' restarted"):
        actor.restart()
        await proxy.generate("child1", GREEDY)  # generated into: cannot be rebuilt
