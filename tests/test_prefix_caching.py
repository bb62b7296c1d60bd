"""Automatic prefix caching in the engine: hash-chained full blocks reused across contexts."""

from __future__ import annotations

from parrot_actors.engines import Engine
from parrot_actors.messages import SamplingParams
from tests.conftest import tiny_config

GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)
PROMPT = list(range(100, 200))  # 100 tokens: 6 full blocks of 16 before the last token


async def run(engine: Engine, cid: str, tokens: list[int]):
    fill = await engine.fill(cid, token_ids=tokens)
    out = await engine.generate(cid, GREEDY)
    await engine.free_context(cid)
    return fill, out


async def test_second_request_reuses_cached_blocks():
    engine = await Engine.start(tiny_config())
    try:
        f1, o1 = await run(engine, "a", PROMPT)
        assert (f1.computed_tokens, f1.reused_tokens) == (100, 0)
        assert engine.stats().kv_cached_blocks == 6  # the partial 7th block is not cached
        f2, o2 = await run(engine, "b", PROMPT)
        assert (f2.computed_tokens, f2.reused_tokens) == (4, 96)
        assert o2.token_ids == o1.token_ids
        f3, _ = await run(engine, "c", PROMPT[:40] + [7] * 60)
        assert f3.reused_tokens == 32  # two blocks match, the third differs
        assert engine.stats().kv_blocks_used == 0
    finally:
        await engine.close()


async def test_caching_off_recomputes_everything():
    engine = await Engine.start(tiny_config(prefix_caching=False))
    try:
        await run(engine, "a", PROMPT)
        f2, _ = await run(engine, "b", PROMPT)
        assert (f2.computed_tokens, f2.reused_tokens) == (100, 0)
        assert engine.stats().kv_cached_blocks == 0
    finally:
        await engine.close()


async def test_cached_blocks_are_evicted_under_pressure():
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    engine = await Engine.start(tiny_config(kv_cache_bytes=10 * per_block))
    try:
        await run(engine, "a", PROMPT)
        assert engine.stats().kv_cached_blocks == 6
        # 150 tokens need all 10 blocks: the cached ones are evicted, nothing fails.
        f, out = await run(engine, "big", list(range(300, 450)))
        assert f.computed_tokens == 150 and len(out.token_ids) == 5
        f2, _ = await run(engine, "again", PROMPT)
        assert f2.reused_tokens == 0
    finally:
        await engine.close()
