"""The engine survives its clients and its own faults: state changes only between steps,
per-request faults stay per request, a failed loop is rebuilt, KV pressure never hangs."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import parrot_actors as pa
from parrot_actors.engines import Engine, EngineConfig
from parrot_actors.engines import contexts as contexts_module
from parrot_actors.engines.core import EngineCore
from parrot_actors.engines.engine import build_core
from parrot_actors.errors import (
    EngineDiedError,
    EngineError,
    InvalidRequestError,
    SamplingError,
)
from parrot_actors.messages import LATENCY_PRIORITY, THROUGHPUT_PRIORITY, SamplingParams
from tests.conftest import TINY, tiny_config

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


class Gate:
    """Wraps a runner's forward: when armed, the next step blocks in its worker thread until
    `release` is set, so a test can act while a step is in flight."""

    def __init__(self, engine: Engine) -> None:
        self.runner = engine.core.runner
        self.inner = self.runner.forward
        self.entered = threading.Event()
        self.release = threading.Event()
        self.armed = False
        self.runner.forward = self

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(30)
        return self.inner(*args, **kwargs)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30)


async def serve_ok(engine: Engine, cid: str, prompt: list[int] = PROMPT) -> list[int]:
    await engine.fill(cid, token_ids=prompt)
    result = await engine.generate(cid, GREEDY)
    await engine.free_context(cid)
    return result.token_ids


async def test_free_during_a_step_waits_for_the_step_and_the_engine_serves_on():
    engine = await Engine.start(tiny_config())
    try:
        reference = await serve_ok(engine, "ref")
        gate = Gate(engine)
        await engine.fill("a", token_ids=PROMPT)
        gate.armed = True
        gen = asyncio.ensure_future(engine.generate("a", SamplingParams(max_tokens=50)))
        await gate.wait_entered()
        used = engine.stats().kv_blocks_used
        free = asyncio.ensure_future(engine.free_context("a"))
        await asyncio.sleep(0.1)  # the event loop runs; the step is still in its thread
        assert "a" in engine.core.contexts and not free.done()
        assert engine.stats().kv_blocks_used == used  # no block went back during the step
        gate.release.set()
        await free
        with pytest.raises(EngineError, match="'a' was freed"):
            await gen
        assert "a" not in engine.core.contexts
        assert await serve_ok(engine, "after") == reference
        stats = engine.stats()
        assert (stats.kv_blocks_used, stats.healthy, stats.restarts) == (0, True, 0)
    finally:
        await engine.close()


async def test_cancel_during_a_step_is_applied_after_it():
    engine = await Engine.start(tiny_config())
    try:
        gate = Gate(engine)
        await engine.fill("a", token_ids=PROMPT)
        gate.armed = True
        gen = asyncio.ensure_future(engine.generate("a", SamplingParams(max_tokens=50)))
        await gate.wait_entered()
        gen.cancel()
        await asyncio.sleep(0.05)
        assert engine.stats().running == 1  # still in the batch until the step ends
        gate.release.set()
        with pytest.raises(asyncio.CancelledError):
            await gen
        await engine.flush()
        assert (engine.stats().running, engine.stats().waiting) == (0, 0)
        # The step in flight was skipped for it: the context holds the prompt and the one
        # token sampled at admission (from the fill's logits), nothing from the step.
        ctx = engine.core.contexts.get("a")
        assert (len(ctx.tokens), ctx.num_computed) == (len(PROMPT) + 1, len(PROMPT))
        await engine.free_context("a")
        await engine.flush()
        assert engine.stats().kv_blocks_used == 0
    finally:
        await engine.close()


async def test_a_fork_during_a_step_copies_blocks_after_it():
    engine = await Engine.start(tiny_config())
    try:
        parent = list(range(100, 120))  # 20 tokens: one full block and a partial one
        await engine.fill("p", token_ids=parent)
        plain = await serve_ok(engine, "plain", parent + [7, 8])
        gate = Gate(engine)
        await engine.fill("busy", token_ids=PROMPT)
        gate.armed = True
        busy = asyncio.ensure_future(engine.generate("busy", GREEDY))
        await gate.wait_entered()
        fork = asyncio.ensure_future(engine.fill("child", token_ids=[7, 8], parent_context_id="p"))
        await asyncio.sleep(0.05)
        assert "child" not in engine.core.contexts  # not even created while the step runs
        gate.release.set()
        assert (await fork).reused_tokens == 20
        assert (await engine.generate("child", GREEDY)).token_ids == plain
        await busy
    finally:
        await engine.close()


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, top_p=1e-300, seed=1),
        SamplingParams(max_tokens=6, ignore_eos=True, temperature=1e-30, seed=2),
        SamplingParams(max_tokens=6, ignore_eos=True, temperature=1e-300),
        SamplingParams(max_tokens=6, ignore_eos=True, temperature=5e-324, top_k=3),
        SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.7, top_k=1, seed=(1 << 64) - 1),
        SamplingParams(max_tokens=6, ignore_eos=True, temperature=1e300, top_k=1, seed=-(1 << 63)),
    ],
    ids=["top_p=1e-300", "T=1e-30", "T=1e-300", "T=min-subnormal", "top_k=1,max-seed", "T=1e300"],
)
async def test_extreme_sampling_values_work_and_equal_greedy(tiny_engine: Engine, sampling):
    greedy = await serve_ok(tiny_engine, "g")
    await tiny_engine.fill("x", token_ids=PROMPT)
    out = await tiny_engine.generate("x", sampling)
    await tiny_engine.free_context("x")
    # Each of these leaves only the most likely token (ties aside, which random logits lack).
    assert out.token_ids == greedy
    assert tiny_engine.stats().healthy


@pytest.mark.parametrize(
    "sampling,match",
    [
        (SamplingParams(seed=1 << 64), "seed=18446744073709551616: must be an integer in"),
        (SamplingParams(seed=-(1 << 63) - 1), "seed=-9223372036854775809"),
        (SamplingParams(temperature=float("inf")), "temperature=inf: must be a finite"),
        (SamplingParams(temperature=float("nan")), "temperature=nan"),
        (SamplingParams(top_p=float("nan")), "top_p=nan"),
        (SamplingParams(top_p=1e-324), "top_p=0.0"),
        (SamplingParams(stop=("x",) * 33), "33 strings given; at most 32"),
        (SamplingParams(stop=("x" * 513,)), "1 to 512 characters"),
    ],
)
async def test_senseless_sampling_values_are_typed_errors(tiny_engine: Engine, sampling, match):
    await tiny_engine.fill("x", token_ids=PROMPT)
    with pytest.raises(InvalidRequestError, match=match):
        await tiny_engine.generate("x", sampling)
    await tiny_engine.free_context("x")
    assert len(await serve_ok(tiny_engine, "ok")) == 6


async def test_a_failing_token_callback_fails_only_its_request(tiny_engine: Engine):
    reference = await serve_ok(tiny_engine, "ref")

    def explode(delta: object) -> None:
        raise RuntimeError("listener bug")

    await tiny_engine.fill("bad", token_ids=PROMPT)
    await tiny_engine.fill("good", token_ids=PROMPT)
    bad = tiny_engine._generate("bad", GREEDY, None, 0, explode)
    good = tiny_engine.generate("good", GREEDY)
    bad_out, good_out = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(bad_out, SamplingError) and "listener bug" in str(bad_out)
    assert good_out.token_ids == reference
    assert tiny_engine.stats().restarts == 0


async def test_nan_logits_fail_the_step_requests_not_the_engine(tiny_engine: Engine):
    reference = await serve_ok(tiny_engine, "ref")
    runner = tiny_engine.core.runner
    inner = runner.forward
    poisoned = [True]

    def nan_once(*args: object, **kwargs: object) -> torch.Tensor:
        out = inner(*args, **kwargs)
        if poisoned[0]:
            poisoned[0] = False
            out = torch.full_like(out, float("nan"))
        return out

    runner.forward = nan_once
    await tiny_engine.fill("x", token_ids=[3, 4, 5])
    with pytest.raises(SamplingError, match="logits contain NaN"):
        # The fill's step computed the (poisoned) logits; sampling them fails this request.
        await tiny_engine.generate("x", GREEDY)
    await tiny_engine.free_context("x")
    assert await serve_ok(tiny_engine, "after") == reference
    assert tiny_engine.stats().restarts == 0


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.8, 7)])
async def test_nan_in_one_row_of_a_batched_step_fails_only_that_request(
    tiny_engine: Engine, temperature: float, seed: int | None
):
    # Greedy rows and seeded sampled rows alike: the other request's tokens are the ones it
    # gets alone.
    prompts = {"a": PROMPT, "b": [20, 21, 22, 23, 24]}
    params = {
        name: SamplingParams(
            max_tokens=12,
            temperature=temperature,
            seed=None if seed is None else seed + i,
            ignore_eos=True,
        )
        for i, name in enumerate(prompts)
    }
    reference = {}
    for name, ids in prompts.items():
        await tiny_engine.fill("ref", token_ids=ids)
        reference[name] = (await tiny_engine.generate("ref", params[name])).token_ids
        await tiny_engine.free_context("ref")
    assert reference["a"] != reference["b"]
    core = tiny_engine.core
    inner, picks = core.runner.forward, core._batched_tokens
    poisoned, batched = [True], []

    def nan_in_row_0(*args: object, **kwargs: object) -> torch.Tensor:
        out = inner(*args, **kwargs)
        if poisoned[0] and out.shape[0] == 2:  # a decode step of both requests
            poisoned[0] = False
            out = out.clone()
            out[0] = float("nan")
        return out

    def spy(*args: object) -> dict[int, int]:
        got = picks(*args)
        batched.append(sorted(got.values()))
        return got

    for name, ids in prompts.items():
        await tiny_engine.fill(name, token_ids=ids)
    core.runner.forward, core._batched_tokens = nan_in_row_0, spy
    try:
        got = await asyncio.gather(
            *(tiny_engine.generate(name, params[name]) for name in prompts),
            return_exceptions=True,
        )
    finally:
        core.runner.forward, core._batched_tokens = inner, picks
    assert not poisoned[0] and [-1] == [t for step in batched for t in step if t < 0]
    failed = [i for i, g in enumerate(got) if isinstance(g, SamplingError)]
    assert len(failed) == 1 and "logits contain NaN" in str(got[failed[0]])
    (other,) = {0, 1} - set(failed)
    assert got[other].token_ids == reference["ab"[other]]
    for name in prompts:
        await tiny_engine.free_context(name)
    assert tiny_engine.stats().restarts == 0


async def test_a_fault_in_the_forward_pass_restarts_the_engine():
    engine = await Engine.start(tiny_config(restart_backoff_s=0.3))
    health: list[bool] = []
    engine.add_listener(lambda e: health.append(e.healthy))
    try:
        reference = await serve_ok(engine, "ref")
        await engine.fill("idle", token_ids=PROMPT)
        runner = engine.core.runner
        inner = runner.forward
        faults = [1]

        def faulty(*args: object, **kwargs: object) -> torch.Tensor:
            if faults[0]:
                faults[0] -= 1
                raise RuntimeError("injected device fault")
            return inner(*args, **kwargs)

        await engine.fill("victim", token_ids=PROMPT)
        runner.forward = faulty
        with pytest.raises(EngineDiedError, match="injected device fault"):
            await engine.generate("victim", GREEDY)  # fill's logits exist; its decode step dies
        assert not engine.healthy and "injected device fault" in engine.stats().last_error
        # Requests sent while it is down wait for the rebuild; lost contexts say so.
        out = await asyncio.wait_for(serve_ok(engine, "new"), 10)
        assert out == reference
        with pytest.raises(EngineDiedError, match="'idle' was lost"):
            await engine.generate("idle", GREEDY)
        await engine.free_context("idle")  # forgetting a lost context succeeds
        await engine.free_context("victim")
        stats = engine.stats()
        assert (stats.healthy, stats.restarts, stats.kv_blocks_used) == (True, 1, 0)
        assert health == [False, True]
    finally:
        await engine.close()


async def test_idle_contexts_are_evicted_and_recomputed_under_kv_pressure():
    # 12 blocks of 16 tokens. Two idle contexts of 80 tokens hold 10; a third prompt needs 6.
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    engine = await Engine.start(tiny_config(kv_cache_bytes=12 * per_block, prefix_caching=False))
    try:
        a, b, c = (list(range(s, s + 80)) for s in (100, 300, 500))
        await engine.fill("a", token_ids=a)
        await engine.fill("b", token_ids=b)
        assert engine.stats().kv_blocks_used == 10
        out_c = await serve_ok(engine, "c", c)
        stats = engine.stats()
        assert stats.evictions == 1 and engine.core.contexts.get("a").num_computed == 0
        assert engine.core.contexts.get("b").num_computed == 80  # only what was needed went
        # The evicted context is recomputed when used, with the same result as a fresh one.
        out_a = (await engine.generate("a", GREEDY)).token_ids
        await engine.free_context("a")
        await engine.free_context("b")
        assert out_a == await serve_ok(engine, "a2", a)
        assert out_c == await serve_ok(engine, "c2", c)
    finally:
        await engine.close()


async def concurrent_prompts(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    async def one(i: int, prompt: list[int]) -> list[int]:
        await engine.fill(f"p{i}", token_ids=prompt)  # fill, then generate: the OpenAI path
        out = await engine.generate(f"p{i}", SamplingParams(max_tokens=8, ignore_eos=True))
        await engine.free_context(f"p{i}")
        return out.token_ids

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def test_sixteen_long_prompts_in_a_third_of_the_kv_they_need_all_complete():
    model = {**TINY, "max_position_embeddings": 2048}
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    need = 16 * -(-(1500 + 8) // 16)  # blocks for all 16 at once
    prompts = [[(7 * i + j) % 40000 + 100 for j in range(1500)] for i in range(16)]
    big = await Engine.start(EngineConfig(random_model=model, kv_cache_bytes=need * per_block))
    try:
        expected = await concurrent_prompts(big, prompts)
    finally:
        await big.close()
    small = await Engine.start(
        EngineConfig(random_model=model, kv_cache_bytes=(need // 3) * per_block)
    )
    try:
        got = await asyncio.wait_for(concurrent_prompts(small, prompts), 300)
        assert got == expected
        await small.flush()
        stats = small.stats()
        assert stats.kv_blocks_total == need // 3 and stats.kv_blocks_used == 0
        # The KV held a third of them at a time, and a prompt joined running work only when all
        # its blocks were free: nothing preempted, no prompt token computed twice.
        assert stats.max_batch_size < 16
        assert (stats.preemptions, stats.prefill_tokens) == (0, 16 * 1500)
        assert (stats.running, stats.waiting, stats.restarts) == (0, 0, 0)
    finally:
        await small.close()


async def test_colliding_cache_keys_never_share_kv(monkeypatch):
    monkeypatch.setattr(contexts_module, "block_key", lambda parent, tokens: b"collision")
    one, two = list(range(100, 140)), list(range(200, 240))
    fresh = await Engine.start(tiny_config())
    try:
        expected = await serve_ok(fresh, "two", two)
    finally:
        await fresh.close()
    engine = await Engine.start(tiny_config())
    try:
        await serve_ok(engine, "one", one)
        assert engine.stats().kv_cached_blocks == 1  # every block got the same key: one kept
        fill = await engine.fill("two", token_ids=two)
        assert fill.reused_tokens == 0  # the key matched, the tokens did not
        assert (await engine.generate("two", GREEDY)).token_ids == expected
    finally:
        await engine.close()


@pa.semantic_function(max_tokens=8)
def answer(q: pa.Input, a: pa.Output):
    """You are a careful assistant. You are a careful assistant. You are a careful assistant.
    You are a careful assistant. You are a careful assistant. You are a careful assistant.
    Q: {{q}}
    A: {{a}}"""


async def test_after_a_restart_the_scheduler_rebuilds_prefixes_it_held():
    engine = await Engine.start(tiny_config(restart_backoff_s=0.1))
    try:
        async with pa.Runtime(engines=[engine]) as rt:

            async def ask() -> list[str]:
                return await pa.gather(*[answer(pa.Variable(q)) for q in "xyz"])

            first = await ask()
            assert len(rt.scheduler.prefixes.entries) == 1  # kept in the static LRU
            runner = engine.core.runner
            inner, faults = runner.forward, [1]

            def faulty(*args: object, **kwargs: object) -> torch.Tensor:
                if faults[0]:
                    faults[0] -= 1
                    raise RuntimeError("injected")
                return inner(*args, **kwargs)

            runner.forward = faulty
            assert await ask() == first  # died, retried, the lost prefix context rebuilt
            assert engine.stats().restarts == 1
            entry = next(iter(rt.scheduler.prefixes.entries.values()))
            assert entry.context_id in engine.core.contexts  # a live one, not the lost one
    finally:
        await engine.close()


def steps_of_a_latency_call_beside_throughput_work(cap: int | None) -> list[list[tuple]]:
    """`steps_beside_throughput_work` on a core limited to `cap` throughput tokens a step."""
    core = build_core(tiny_config(throughput_step_tokens=cap, prefix_caching=False))
    return steps_beside_throughput_work(core)


def steps_beside_throughput_work(core: EngineCore) -> list[list[tuple]]:
    """(context, kind, priority, new tokens) of each step of `core` running a latency call
    (10-token fill, 3 tokens generated) next to a 40-token throughput fill."""

    def done(result: object, error: object) -> None:
        assert error is None

    lat, _ = core.open_context("lat", None)
    core.add_fill(lat, list(range(100, 110)), LATENCY_PRIORITY, 0, done)
    core.add_generate(lat, SamplingParams(max_tokens=3, ignore_eos=True), LATENCY_PRIORITY, done)
    tp, _ = core.open_context("tp", None)
    core.add_fill(tp, list(range(200, 240)), THROUGHPUT_PRIORITY, 0, done)
    steps = []
    while core.has_work():
        plan = core.schedule()
        assert plan is not None
        steps.append([(r.ctx.id, r.kind, r.priority, n) for r, n in plan.items])
        core.finish_step(plan, core.execute(plan))
    return steps


def test_throughput_work_adds_few_tokens_to_steps_with_latency_work():
    lat_fill, lat_decode = ("lat", "fill", 0, 10), ("lat", "generate", 0, 1)
    assert steps_of_a_latency_call_beside_throughput_work(8) == [
        [lat_fill, ("tp", "fill", 1, 8)],
        [("tp", "fill", 1, 8), lat_decode],  # the layout puts prefill before decodes
        [("tp", "fill", 1, 8), lat_decode],
        [("tp", "fill", 1, 16)],  # the latency call is done: the whole budget again
    ]
    # Without the limit (the request-level baseline) the 40 tokens share the first step.
    assert steps_of_a_latency_call_beside_throughput_work(None) == [
        [lat_fill, ("tp", "fill", 1, 40)],
        [lat_decode],
        [lat_decode],
    ]
    with pytest.raises(InvalidRequestError, match="throughput_step_tokens=0"):
        tiny_config(throughput_step_tokens=0).validate()
