"""The frontend on real engines: it sends exactly the prompts an app would send by hand."""

from __future__ import annotations

import pytest

import parrot_actors as pa
from parrot_actors.engines import Engine
from parrot_actors.messages import SamplingParams
from tests.conftest import tiny_config


@pa.semantic_function(max_tokens=24)
def outline(topic: pa.Input, out: pa.Output):
    """Write a one-line outline of an essay about {{topic}}.
    Outline: {{out}}"""


@pa.semantic_function(max_tokens=24)
def draft(plan: pa.Input, out: pa.Output):
    """Turn this outline into a first sentence: {{plan}}
    Sentence: {{out}}"""


@pa.semantic_function(max_tokens=16)
def title(text: pa.Input, out: pa.Output):
    """Give a short title for: {{text}}
    Title: {{out}}"""


async def by_hand(engine: Engine, prompt: str, max_tokens: int) -> str:
    await engine.fill("hand", text=prompt)
    result = await engine.generate("hand", SamplingParams(max_tokens=max_tokens))
    await engine.free_context("hand")
    return result.text


@pytest.mark.real_model
async def test_chain_of_three_equals_prompts_by_hand(real_engine: Engine):
    async with pa.Runtime(engines=[real_engine]) as rt:
        a = outline(pa.Variable("why cats sleep so much"))
        b = draft(a)
        c = title(b)
        got = [await c, a.value(), b.value()]
        assert rt.stats().calls_completed == 3
    a_ref = await by_hand(
        real_engine,
        "Write a one-line outline of an essay about why cats sleep so much.\nOutline: ",
        24,
    )
    b_ref = await by_hand(
        real_engine, f"Turn this outline into a first sentence: {a_ref}\nSentence: ", 24
    )
    c_ref = await by_hand(real_engine, f"Give a short title for: {b_ref}\nTitle: ", 16)
    assert got == [c_ref, a_ref, b_ref]
    assert all(got)
    await real_engine.flush()
    assert real_engine.stats().kv_blocks_used == 0


async def test_failing_call_on_a_model_engine_spares_other_apps():
    engine = await Engine.start(tiny_config())
    try:
        async with pa.Runtime(engines=[engine]):
            too_long = outline(pa.Variable("word " * 600))  # > 512 tokens, the model's limit
            downstream = title(draft(too_long))
            fine = title(pa.Variable("a calm lake"))
            with pytest.raises(pa.CallError):
                await downstream
            assert isinstance(await fine, str)
        await engine.flush()  # frees are applied by the engine loop, between steps
        assert engine.stats().kv_blocks_used == 0
    finally:
        await engine.close()
