"""Every engine implementation conforms to the one engine contract (`EngineClient`): the local
`Engine` (tiny random model), the simulated `Engine` (`device="sim"`), the fake `EchoEngine`,
and the Ray proxy `RayEngine` (over an
in-process stand-in for its actor that forwards to a tiny `Engine`, so no cluster is needed;
`ray.cancel` is replaced for it, since the real one would start a local Ray instance that
outlives this module). Each check runs against each implementation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import pytest

from parrot_actors.engines import Engine, EngineConfig, SimConfig
from parrot_actors.engines.api import EngineClient
from parrot_actors.engines.echo import EchoEngine
from parrot_actors.engines.step_time import locate_profiles
from parrot_actors.errors import ContextNotFoundError, InvalidRequestError, ParrotError
from parrot_actors.messages import EngineStats, FillResult, GenerateResult, SamplingParams
from tests.conftest import tiny_config

SAMPLING = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPT = "Once upon a time"


class StandInActor:
    """The engine actor's surface (`call`, `stream`, `stats`, `ping`) over a local engine, with
    Ray's calling convention (`handle.method.remote(...)` returns an awaitable; a streaming
    call returns an async iterator of awaitables) and Ray's error wrapping."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cancelled: list[object] = []  # the streams the proxy cancelled, in order
        self.closing: list[asyncio.Future] = []

    def cancel(self, stream: object) -> None:
        """`ray.cancel` of one of this stand-in's streams: recorded, and the stream closed."""
        assert hasattr(stream, "aclose"), f"ray.cancel of {stream!r}, not a stand-in stream"
        self.cancelled.append(stream)
        # Held, so the closing task is not collected before it runs (asyncio's create_task docs).
        self.closing.append(asyncio.ensure_future(stream.aclose()))

    def __getattr__(self, method: str) -> object:
        actor = self

        class Method:
            def remote(self, *args: object) -> object:
                if method == "stream":  # a streaming call: an iterator of awaitables at once
                    return actor._stream(args)
                return actor.run(method, args)

            def options(self, **_: object) -> Method:
                return self

        return Method()

    async def run(self, method: str, args: tuple) -> object:
        from ray.exceptions import RayTaskError

        from parrot_actors.ray.wire import OpResult

        try:
            if method == "ping":
                return "inc0"
            value = None if method == "stats" else await getattr(self.engine, args[0])(*args[1:])
        except ParrotError as exc:
            raise RayTaskError(method, "traceback", exc).as_instanceof_cause() from None
        return OpResult(value, "inc0", self.engine.stats())

    async def _stream(self, args: tuple) -> AsyncIterator[Awaitable[object]]:
        async for delta in self.engine.generate_stream(*args):
            yield _ready(delta)


async def _ready(value: object) -> object:
    return value


@pytest.fixture(scope="module", params=["engine", "echo", "ray-proxy", "sim"])
async def engine(request):
    kind = request.param
    if kind == "echo":
        yield EchoEngine(name="echo0")
        return
    if kind == "sim":  # real time here: each step sleeps its predicted A100 duration
        try:
            locate_profiles()
        except InvalidRequestError:
            pytest.skip("no GPU profiles (../shared/data/gpu_profiles)")
        sim = await Engine.start(
            EngineConfig(device="sim", sim=SimConfig(gpu="a100-80gb", kv_tokens=8192))
        )
        yield sim
        await sim.close()
        return
    local = await Engine.start(tiny_config())
    try:
        if kind == "engine":
            yield local
        else:
            pytest.importorskip("ray")
            from parrot_actors.ray.proxy import RayEngine
            from parrot_actors.ray.wire import EngineInfo

            info = EngineInfo(
                name=local.name,
                model_name=local.model_name,
                aliases=local.aliases,
                incarnation="inc0",
                stats=local.stats(),
            )
            actor = StandInActor(local)
            proxy = RayEngine(actor, info, local.tokenizer)
            proxy.stand_in = actor  # for the checks that look at cancellation
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr("parrot_actors.ray.proxy.ray.cancel", actor.cancel)
                yield proxy
            await proxy.close()
    finally:
        if kind != "echo":
            await local.close()


async def test_it_is_an_engine_client(engine: EngineClient):
    assert isinstance(engine, EngineClient)
    assert isinstance(engine.name, str) and isinstance(engine.model_name, str)
    assert isinstance(engine.aliases, tuple) and engine.healthy is True
    stats = engine.stats()
    assert isinstance(stats, EngineStats) and stats.name == engine.name and stats.healthy
    engine.add_listener(lambda e: None)


async def test_tokens_and_chat(engine: EngineClient):
    ids = engine.tokenize(PROMPT)
    assert ids and all(isinstance(i, int) for i in ids)
    assert engine.detokenize(ids) == PROMPT
    chat = engine.render_chat([{"role": "user", "content": "hi"}])
    assert isinstance(chat, str) and "hi" in chat
    assert engine.chat_prompt("hi") == chat


async def test_fill_generate_fork_free(engine: EngineClient):
    ids = engine.tokenize(PROMPT, first=True)
    fill = await engine.fill("c", token_ids=ids)
    assert isinstance(fill, FillResult)
    assert (fill.appended_tokens, fill.context_len, fill.reused_tokens) == (len(ids), len(ids), 0)
    fork = await engine.fill("child", text=" and", parent_context_id="c")
    assert fork.reused_tokens == len(ids) and fork.context_len > len(ids)
    out = await engine.generate("c", SAMPLING)
    assert isinstance(out, GenerateResult)
    assert out.completion_tokens == len(out.token_ids) and 0 < len(out.token_ids) <= 6
    assert out.prompt_tokens == len(ids) and out.finish_reason in ("length", "stop")
    assert out.text == engine.detokenize(out.token_ids)
    for cid in ("c", "child"):
        await engine.free_context(cid)
    with pytest.raises(ContextNotFoundError):
        await engine.generate("c", SAMPLING)


async def test_a_stream_is_the_same_generation(engine: EngineClient):
    ids = engine.tokenize(PROMPT, first=True)
    await engine.fill("a", token_ids=ids)
    await engine.fill("b", token_ids=ids)
    whole = await engine.generate("a", SAMPLING)
    deltas = [d async for d in engine.generate_stream("b", SAMPLING)]
    assert "".join(d.text for d in deltas) == whole.text
    assert [d.token_id for d in deltas] == whole.token_ids
    assert all(d.finish_reason is None and d.result is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == whole.finish_reason and last.result is not None
    assert (last.result.token_ids, last.result.text) == (whole.token_ids, whole.text)
    for cid in ("a", "b"):
        await engine.free_context(cid)


async def test_closing_a_stream_early_then_freeing(engine: EngineClient):
    before = engine.stats().kv_blocks_used
    await engine.fill("s", text=PROMPT)
    stream = engine.generate_stream("s", SamplingParams(max_tokens=200, ignore_eos=True))
    async for _ in stream:
        break
    await stream.aclose()
    stand_in = getattr(engine, "stand_in", None)
    if stand_in is not None:  # the Ray proxy cancels the actor's stream it stopped reading
        assert len(stand_in.cancelled) == 1
    await engine.free_context("s")
    await engine.flush()
    await asyncio.sleep(0)
    assert engine.stats().kv_blocks_used == before


async def test_a_fork_of_the_first_tokens(engine: EngineClient):
    ids = engine.tokenize(PROMPT, first=True)
    await engine.fill("p", token_ids=ids)
    await engine.generate("p", SAMPLING)  # the parent grows past the prompt
    fork = await engine.fill("k", token_ids=[], parent_context_id="p", parent_tokens=len(ids) - 1)
    assert (fork.reused_tokens, fork.context_len) == (len(ids) - 1, len(ids) - 1)
    await engine.fill("k", token_ids=ids[-1:])
    await engine.fill("fresh", token_ids=ids)
    forked, fresh = await engine.generate("k", SAMPLING), await engine.generate("fresh", SAMPLING)
    assert forked.token_ids == fresh.token_ids
    assert forked.context_len == len(ids) + len(forked.token_ids)
    with pytest.raises(InvalidRequestError, match="parent_tokens=999"):
        await engine.fill("bad", token_ids=ids, parent_context_id="p", parent_tokens=999)
    for cid in ("p", "k", "fresh"):
        await engine.free_context(cid)


async def test_logprobs_whole_and_streamed(engine: EngineClient):
    await engine.fill("l1", text=PROMPT)
    await engine.fill("l2", text=PROMPT)
    sampling = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=2)
    whole = await engine.generate("l1", sampling)
    assert whole.logprobs is not None and whole.top_logprobs is not None
    assert len(whole.logprobs) == len(whole.top_logprobs) == len(whole.token_ids)
    for lp, top, tok in zip(whole.logprobs, whole.top_logprobs, whole.token_ids):
        assert lp <= 0.0 and len(top) <= 2 and top[0][1] >= lp  # greedy picks the likeliest
        assert top[0][0] == tok
    deltas = [d async for d in engine.generate_stream("l2", sampling)]
    assert [d.logprob for d in deltas] == whole.logprobs
    assert (await engine.generate("l1", SAMPLING)).logprobs is None  # off unless asked
    for cid in ("l1", "l2"):
        await engine.free_context(cid)


async def test_typed_errors(engine: EngineClient):
    with pytest.raises(ContextNotFoundError):
        await engine.generate("nope", SAMPLING)
    with pytest.raises(ContextNotFoundError):
        await engine.free_context("nope")
    with pytest.raises(ContextNotFoundError):
        await engine.fill("x", text="a", parent_context_id="nope")
    with pytest.raises(InvalidRequestError, match="token_ids or text, not both"):
        await engine.fill("x", token_ids=[1], text="a")
    await engine.fill("ok", text=PROMPT)
    with pytest.raises(InvalidRequestError, match="top_p=0.0"):
        await engine.generate("ok", SamplingParams(top_p=0.0))
    with pytest.raises(InvalidRequestError, match="max_tokens=0"):
        async for _ in engine.generate_stream("ok", SamplingParams(max_tokens=0)):
            pass
    await engine.free_context("ok")
