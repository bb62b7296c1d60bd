"""Bad input gets a typed error, and the engine keeps serving everyone else."""

from __future__ import annotations

import asyncio

import pytest

from parrot_actors.engines import Engine
from parrot_actors.errors import (
    CapacityError,
    ContextNotFoundError,
    InvalidRequestError,
    ParrotError,
)
from parrot_actors.messages import SamplingParams
from tests.conftest import tiny_config

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


async def serve_ok(engine: Engine, cid: str) -> list[int]:
    await engine.fill(cid, token_ids=[5, 6, 7, 8])
    result = await engine.generate(cid, GREEDY)
    await engine.free_context(cid)
    return result.token_ids


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda e: e.generate("nope", GREEDY), ContextNotFoundError, "'nope'"),
        (lambda e: e.free_context("nope"), ContextNotFoundError, "'nope'"),
        (
            lambda e: e.fill("x", token_ids=[1], parent_context_id="nope"),
            ContextNotFoundError,
            "'nope'",
        ),
        (lambda e: e.fill("x", token_ids=[]), InvalidRequestError, "empty prompt"),
        (lambda e: e.fill("x", text=""), InvalidRequestError, "empty prompt"),
        (lambda e: e.fill("x", token_ids=[1] * 513), InvalidRequestError, "maximum length is 512"),
        (lambda e: e.fill("x", token_ids=[49152]), InvalidRequestError, "outside the vocabulary"),
        (
            lambda e: e.generate("base", SamplingParams(temperature=-0.5)),
            InvalidRequestError,
            "temperature=-0.5",
        ),
        (lambda e: e.generate("base", SamplingParams(top_p=0.0)), InvalidRequestError, "top_p=0.0"),
        (lambda e: e.generate("base", SamplingParams(top_p=1.5)), InvalidRequestError, "top_p=1.5"),
        (
            lambda e: e.generate("base", SamplingParams(max_tokens=0)),
            InvalidRequestError,
            "max_tokens=0",
        ),
        (
            lambda e: e.generate("base", SamplingParams(max_tokens=-3)),
            InvalidRequestError,
            "max_tokens=-3",
        ),
    ],
)
async def test_bad_input_is_typed_and_engine_keeps_serving(tiny_engine, call, error, match):
    await tiny_engine.fill("base", token_ids=[1, 2, 3])
    expected = await serve_ok(tiny_engine, "before")
    with pytest.raises(error, match=match) as info:
        await call(tiny_engine)
    assert isinstance(info.value, ParrotError)
    assert await serve_ok(tiny_engine, "after") == expected
    assert "x" not in tiny_engine.core.contexts  # a failed create leaves nothing behind
    await tiny_engine.free_context("base")
    assert tiny_engine.stats().kv_blocks_used == 0


async def test_freed_context_is_gone(tiny_engine):
    await tiny_engine.fill("a", token_ids=[1, 2])
    await tiny_engine.free_context("a")
    with pytest.raises(ContextNotFoundError, match="'a'"):
        await tiny_engine.fill("a", token_ids=[3], parent_context_id="a")
    with pytest.raises(ContextNotFoundError):
        await tiny_engine.generate("a", GREEDY)


async def test_request_that_never_fits_is_capacity_error():
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # layers * (K,V) * block * kv_heads * head_dim * fp32
    engine = await Engine.start(tiny_config(kv_cache_bytes=4 * per_block))
    try:
        assert engine.stats().kv_blocks_total == 4
        with pytest.raises(CapacityError, match="needs 5 KV blocks"):
            await engine.fill("big", token_ids=list(range(1, 66)))
        await engine.fill("ok", token_ids=[1, 2, 3])
        with pytest.raises(CapacityError, match="needs 5 KV blocks"):
            await engine.generate("ok", SamplingParams(max_tokens=70))
        result = await engine.generate("ok", SamplingParams(max_tokens=5, ignore_eos=True))
        assert len(result.token_ids) == 5
    finally:
        await engine.close()


async def test_concurrent_failure_does_not_disturb_others(tiny_engine):
    good = [serve_ok(tiny_engine, f"g{i}") for i in range(4)]
    bad = [tiny_engine.generate("missing", GREEDY), tiny_engine.fill("e", token_ids=[])]
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    assert all(isinstance(r, list) and len(r) == 6 for r in results[:4])
    assert isinstance(results[4], ContextNotFoundError)
    assert isinstance(results[5], InvalidRequestError)
