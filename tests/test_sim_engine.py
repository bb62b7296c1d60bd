"""The simulated engine: the real engine core and loop over `SimRunner`, in simulated time.

Step times are the step-time model's predictions, exactly; tokens are a function of the
context's tokens as stored in the paged KV, so forks, prefix-cache hits and recomputation give
the same tokens; KV capacity follows from the model's KV bytes; faults restart it."""

from __future__ import annotations

import asyncio

import pytest

from parrot_actors import clock, simtime
from parrot_actors.engines import Engine, EngineConfig, SimConfig
from parrot_actors.engines.step_time import (
    FEATURES,
    StepShape,
    StepTimeModel,
    locate_profiles,
)
from parrot_actors.errors import (
    CapacityError,
    EngineDiedError,
    EngineError,
    InvalidRequestError,
)
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


def test_under_kv_pressure_preempted_requests_recompute_the_same_tokens():
    # 8 prompts of ~300 tokens generating 40 each in a cache of 1024 tokens: at most 3 fit.
    sampling = SamplingParams(max_tokens=40)

    async def go(engine: Engine) -> tuple[list[list[int]], list[list[int]], int]:
        prompts = [engine.tokenize(f"job {i} " + "words of text " * 100) for i in range(8)]

        async def one(i: int, prefix: str) -> list[int]:
            await engine.fill(f"{prefix}{i}", token_ids=prompts[i])
            out = (await engine.generate(f"{prefix}{i}", sampling)).token_ids
            await engine.free_context(f"{prefix}{i}")
            return out

        together = list(await asyncio.gather(*(one(i, "t") for i in range(8))))
        pressure = engine.stats().preemptions + engine.stats().evictions
        alone = [await one(i, "a") for i in range(8)]
        return together, alone, pressure

    async def main():
        cfg = sim_config(sim=SimConfig(gpu="a100-80gb", model="llama-2-7b", kv_tokens=1024))
        engine = await Engine.start(cfg)
        try:
            return await go(engine)
        finally:
            await engine.close()

    together, alone, pressure = simtime.run(main())
    assert together == alone and all(len(t) == 40 for t in together)
    assert pressure > 0


def test_freeing_a_context_during_its_generation_fails_it_and_the_engine_serves_on():
    async def go(engine: Engine) -> tuple[int, list[int]]:
        ids = engine.tokenize("a long generation " * 20)
        await engine.fill("g", token_ids=ids)
        task = asyncio.ensure_future(engine.generate("g", SamplingParams(max_tokens=500)))
        await asyncio.sleep(0.2)  # ~15 decode steps of a 7B model on an A100
        await engine.free_context("g")
        with pytest.raises(EngineError, match="freed"):
            await task
        await engine.flush()
        used = engine.stats().kv_blocks_used
        await engine.fill("h", token_ids=ids)
        return used, (await engine.generate("h", GREEDY)).token_ids

    used, tokens = run(go)
    assert used == 0 and len(tokens) == 8


def test_real_engines_fit_their_step_times_and_show_the_fit():
    from tests.conftest import tiny_config

    async def go() -> dict[str, float]:
        engine = await Engine.start(tiny_config())
        try:
            for i in range(3):
                ids = engine.tokenize(f"prompt {i} " * (10 + 20 * i))
                await engine.fill(f"p{i}", token_ids=ids)
                await engine.generate(f"p{i}", SamplingParams(max_tokens=20, ignore_eos=True))
            return engine.stats().step_time
        finally:
            await engine.close()

    fit = asyncio.run(go())
    assert fit["samples"] == 60.0  # 3 prefill steps + 3 x 19 decode steps
    assert set(fit) == {"samples", "median_abs_error", "p90_abs_error", *FEATURES}
    assert all(v >= 0 for v in fit.values())


def test_metrics_show_each_engines_step_time_model():
    from types import SimpleNamespace

    from parrot_actors.messages import EngineStats
    from parrot_actors.server.metrics import _LiveCollector

    stats = EngineStats(name="e0", step_time={"samples": 40.0, "median_abs_error": 0.08})
    engine = SimpleNamespace(stats=lambda: stats)
    runtime = SimpleNamespace(engines=[engine], scheduler=None)
    families = {f.name: f for f in _LiveCollector(runtime, lambda: 0).collect()}
    step_time = families["parrot_engine_step_time"].samples
    samples = {tuple(sorted(s.labels.items())): s.value for s in step_time}
    assert samples == {
        (("engine", "e0"), ("quantity", "median_abs_error")): 0.08,
        (("engine", "e0"), ("quantity", "samples")): 40.0,
    }


def test_a_real_time_server_on_simulated_engines_answers_openai_requests():
    import openai

    from parrot_actors.server import BackgroundServer, ServerConfig

    cfg = EngineConfig(device="sim", sim=SimConfig(gpu="h100", model="llama-3-8b", kv_tokens=8192))
    server = BackgroundServer([cfg], ServerConfig(port=0)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data][0] == "llama-3-8b"
        got = client.completions.create(model="default", prompt="Hello there", max_tokens=12)
        assert got.usage.completion_tokens == 12 and got.choices[0].finish_reason == "length"
        assert got.choices[0].text.strip()  # words of the tokenizer, no EOS
    finally:
        server.stop()


def test_a_prompt_joins_running_work_only_when_all_its_blocks_fit():
    # Two 2,200-token prompts in 4,096 tokens of KV: the second waits for the first instead
    # of being prefilled into the free blocks and preempted by the first's decode, again and
    # again (10,016 prompt tokens computed for 4,400 before this rule).
    sim = SimConfig(gpu="a100-80gb", model="vicuna-13b", kv_tokens=4096)

    async def main() -> tuple[int, int, list[float]]:
        engine = await Engine.start(sim_config(sim=sim, max_batch_tokens=8000))
        try:
            done: list[float] = []

            async def one(i: int) -> None:
                await engine.fill(f"p{i}", token_ids=[1000 + i] + [2000] * 2199)
                await engine.generate(f"p{i}", SamplingParams(max_tokens=50))
                done.append(clock.now())

            await asyncio.gather(one(0), one(1))
            s = engine.stats()
            return s.prefill_tokens, s.preemptions, done
        finally:
            await engine.close()

    prefill, preemptions, done = simtime.run(main())
    assert (prefill, preemptions) == (4400, 0)
    assert done[1] == pytest.approx(2 * done[0], rel=0.01)  # one after the other
