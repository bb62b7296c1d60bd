"""The engine on the real SmolLM2 model: equality with transformers, fork, preemption."""

from __future__ import annotations

import asyncio

import pytest
import torch

from parrot_actors.engines import Engine, EngineConfig
from parrot_actors.messages import SamplingParams

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY32 = SamplingParams(max_tokens=32)


async def fill_and_generate(engine: Engine, cid: str, prompt: str, sampling: SamplingParams):
    await engine.fill(cid, text=prompt)
    result = await engine.generate(cid, sampling)
    await engine.free_context(cid)
    return result


async def test_batched_greedy_equals_transformers(real_engine: Engine, hf_model):
    assert real_engine.core.runner.kernels  # the default: the engine's CPU kernels
    await check_batched_greedy(real_engine, hf_model)


async def test_batched_greedy_equals_transformers_with_torch_ops(hf_model):
    engine = await Engine.start(EngineConfig(name="eager", compile=False))
    try:
        assert not engine.core.runner.kernels
        await check_batched_greedy(engine, hf_model)
    finally:
        await engine.close()


async def check_batched_greedy(real_engine: Engine, hf_model) -> None:
    """The 4 prompts generated together equal transformers' greedy `generate`, token for
    token."""
    steps_before = real_engine.stats().steps
    results = await asyncio.gather(
        *[fill_and_generate(real_engine, f"hf{i}", p, GREEDY32) for i, p in enumerate(PROMPTS)]
    )
    # Batched: 4 generations of <= 32 tokens took at most 32 + 4 steps, not 4 x 32.
    assert real_engine.stats().steps - steps_before <= 36
    for prompt, result in zip(PROMPTS, results):
        ids = real_engine.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf_model.generate(ids, do_sample=False, max_new_tokens=32)[0, ids.shape[1] :]
        assert result.token_ids == ref.tolist()
        assert result.text == real_engine.detokenize(result.token_ids)
        assert result.completion_tokens == len(result.token_ids)
        assert result.prompt_tokens == ids.shape[1]


def long_prompt(engine: Engine, n: int) -> list[int]:
    text = " ".join(f"Item {i} is a fact about the number {i * 7}." for i in range(400))
    ids = engine.tokenize(text)
    assert len(ids) >= n
    return ids[:n]


async def test_fork_equals_unforked_without_recompute(real_engine: Engine):
    parent = long_prompt(real_engine, 600)
    suffix = real_engine.tokenize(" In summary, the list says")
    await real_engine.fill("fork-parent", token_ids=parent)
    before = real_engine.stats()
    fill = await real_engine.fill("fork-child", token_ids=suffix, parent_context_id="fork-parent")
    forked = await real_engine.generate("fork-child", SamplingParams(max_tokens=16))
    after = real_engine.stats()
    assert fill.reused_tokens == 600 and fill.computed_tokens == len(suffix)
    assert after.prefill_tokens - before.prefill_tokens == len(suffix)
    assert after.reused_tokens - before.reused_tokens == 600
    await real_engine.fill("flat", token_ids=parent + suffix)
    flat = await real_engine.generate("flat", SamplingParams(max_tokens=16))
    assert forked.token_ids == flat.token_ids
    for cid in ("fork-parent", "fork-child", "flat"):
        await real_engine.free_context(cid)
    assert real_engine.stats().kv_blocks_used == 0


async def test_sixteen_forks_share_parent_blocks(real_engine: Engine):
    bs = real_engine.stats().block_size
    parent = long_prompt(real_engine, 1000)
    await real_engine.fill("p16", token_ids=parent)
    parent_blocks = real_engine.stats().kv_blocks_used
    assert parent_blocks == -(-1000 // bs)

    async def child(i: int):
        await real_engine.fill(
            f"p16-{i}", token_ids=real_engine.tokenize(f" Question {i}:"), parent_context_id="p16"
        )
        return await real_engine.generate(f"p16-{i}", SamplingParams(max_tokens=8, ignore_eos=True))

    results = await asyncio.gather(*[child(i) for i in range(16)])
    used = real_engine.stats().kv_blocks_used
    own_blocks = max(-(-(1000 % bs + 12 + 8) // bs), 1)
    assert used <= parent_blocks + 16 * (own_blocks + 1)
    assert all(len(r.token_ids) == 8 for r in results)
    await real_engine.free_context("p16")
    assert real_engine.stats().kv_blocks_used == used - (parent_blocks - 1000 // bs)
    for i in range(16):
        await real_engine.free_context(f"p16-{i}")
    assert real_engine.stats().kv_blocks_used == 0


async def test_small_kv_budget_preempts_and_matches(real_engine: Engine):
    prompts = [
        f"Write a short story about a {animal}."
        for animal in ("cat", "dog", "fox", "owl", "bee", "cow")
    ]
    sampling = SamplingParams(max_tokens=40, ignore_eos=True)
    big = await asyncio.gather(
        *[fill_and_generate(real_engine, f"big{i}", p, sampling) for i, p in enumerate(prompts)]
    )
    per_block = real_engine.core.runner.kv_bytes_per_block(16)
    small = await Engine.start(EngineConfig(name="small", kv_cache_bytes=8 * per_block))
    try:
        assert small.stats().kv_blocks_total == 8
        out = await asyncio.gather(
            *[fill_and_generate(small, f"s{i}", p, sampling) for i, p in enumerate(prompts)]
        )
        assert small.stats().preemptions > 0
        assert [r.token_ids for r in out] == [r.token_ids for r in big]
        assert small.stats().kv_blocks_used == 0
    finally:
        await small.close()
