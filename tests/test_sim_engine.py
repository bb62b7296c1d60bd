"""The simulated engine: the real engine core and loop over `SimRunner`, in simulated time.

Step times are the step-time model's predictions, exactly; tokens are a function of the
context's tokens as stored in the paged KV, so forks, prefix-cache hits and recomputation give
the same tokens; KV capacity follows from the model's KV bytes; faults restart it."""

from __future__ import annotations

import asyncio

import pytest

from parrot_actors import clock, simtime
from parrot_actors.engines import Engine, EngineConfig, SimConfig
from parrot_actors.engines.step_time import StepShape, StepTimeModel, locate_profiles
from parrot_actors.errors import CapacityError, EngineDiedError, InvalidRequestError
from parrot_actors.messages import SamplingParams

try:
    locate_profiles()
except InvalidRequestError:  # the shared GPU profiles are not beside this checkout
    pytest.skip("no GPU profiles (../shared/data/gpu_profiles)", allow_module_level=True)

SIM = SimConfig(gpu="a100-80gb", model="llama-2-7b", kv_tokens=4096)
GREEDY = SamplingParams(max_tokens=8)


def sim_config(**overrides: object) -> EngineConfig:
    fields = {"device": "sim", "sim": SIM, "max_batch_tokens": 4096, **overrides}
    return EngineConfig(**fields)  # type: ignore[arg-type]


def run(coro_fn):
    """Run `coro_fn(engine)` on a fresh simulated engine in simulated time."""

    async def main():
        engine = await Engine.start(sim_config())
        try:
            return await coro_fn(engine)
        finally:
            await engine.close()

    return simtime.run(main())


def test_one_request_takes_exactly_its_predicted_steps():
    model = StepTimeModel.for_device("a100-80gb", "llama-2-7b")

    async def go(engine: Engine) -> tuple[float, list[int]]:
        ids = engine.tokenize("word " * 99, first=True)
        assert len(ids) == 100
        start = clock.now()
        await engine.fill("c", token_ids=ids)
        out = await engine.generate("c", GREEDY)
        return clock.now() - start, out.token_ids

    elapsed, tokens = run(go)
    # One prefill step of 100 tokens gives the first token; 7 decode steps give the rest.
    expected = model.predict(StepShape(prefill=((100, 0),)))
    expected += sum(model.predict(StepShape(decode=(100 + i,))) for i in range(1, 8))
    assert elapsed == pytest.approx(expected, rel=1e-12)
    assert len(tokens) == 8  # no EOS: runs to max_tokens


def test_fork_cache_hit_and_recompute_give_the_same_tokens():
    async def go(engine: Engine) -> list[list[int]]:
        ids = engine.tokenize("the shared system prompt of many requests " * 8, first=True)
        await engine.fill("a", token_ids=ids)
        first = (await engine.generate("a", GREEDY)).token_ids
        # The scheduler's way: fork all but the last prompt token, then fill that one.
        n = len(ids) - 1
        await engine.fill("fork", token_ids=[], parent_context_id="a", parent_tokens=n)
        await engine.fill("fork", token_ids=ids[-1:])
        forked = (await engine.generate("fork", GREEDY)).token_ids
        await engine.fill("hit", token_ids=ids)  # automatic prefix caching: full blocks reused
        hit = (await engine.generate("hit", GREEDY)).token_ids
        return [first, forked, hit, [len(ids), engine.stats().reused_tokens]]

    first, forked, hit, (prompt, reused) = run(go)
    assert first == forked == hit and len(set(first)) > 1
    # The fork reuses all but the last prompt token, the cache hit the prompt's full blocks.
    assert prompt == 57 and reused == 56 + 48


def test_kv_capacity_follows_the_model_and_a_request_too_big_is_refused():
    async def go(engine: Engine) -> int:
        total = engine.stats().kv_blocks_total
        with pytest.raises(CapacityError):
            await engine.fill("big", token_ids=[1000] * 5000)
        return total

    # 4096 tokens of KV in 16-token blocks; llama-2-7b holds 512 KiB of fp16 KV per token.
    assert run(go) == 4096 // 16
    cfg = SimConfig(gpu="a100-80gb", model="llama-2-7b", kv_cache_gb=1.0)
    model = cfg.step_model()
    assert cfg.kv_cache_bytes(model) // (524288 * 16) == 119


def test_two_runs_give_identical_timings_and_tokens():
    async def go(engine: Engine) -> list[tuple[float, list[int]]]:
        async def one(i: int) -> tuple[float, list[int]]:
            await asyncio.sleep(0.01 * i)
            ids = engine.tokenize(f"request {i} " + "text " * (20 * i + 5), first=True)
            start = clock.now()
            await engine.fill(f"r{i}", token_ids=ids)
            out = await engine.generate(f"r{i}", SamplingParams(max_tokens=5 + i))
            return clock.now() - start, out.token_ids

        return list(await asyncio.gather(*(one(i) for i in range(12))))

    assert run(go) == run(go)


def test_a_fault_in_a_step_restarts_the_simulated_engine():
    async def go(engine: Engine) -> tuple[int, list[int]]:
        runner = engine.core.runner
        original = runner.forward
        calls = {"n": 0}

        def broken(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated device fault")
            return original(*args, **kwargs)

        runner.forward = broken  # type: ignore[method-assign]
        ids = engine.tokenize("hello there " * 10, first=True)
        await engine.fill("x", token_ids=ids)
        with pytest.raises(EngineDiedError):
            await engine.generate("x", GREEDY)
        for _ in range(100):
            if engine.healthy:
                break
            await asyncio.sleep(0.5)
        await engine.fill("y", token_ids=ids)
        return engine.restarts, (await engine.generate("y", GREEDY)).token_ids

    restarts, tokens = run(go)
    assert restarts == 1 and len(tokens) == 8


def test_sim_config_errors_name_the_value():
    with pytest.raises(InvalidRequestError, match="needs device='sim'"):
        EngineConfig(sim=SIM).validate()
    with pytest.raises(InvalidRequestError, match="kv_tokens=0"):
        SimConfig(kv_tokens=0).kv_cache_bytes(SIM.step_model())
    with pytest.raises(InvalidRequestError, match="fit=PATH"):
        SimConfig(gpu="cpu-fitted").step_model()
