"""Sampling, stop conditions, streaming and multi-turn contexts on a tiny random model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from parrot_actors.engines.sampler import sample, sample_rows
from parrot_actors.errors import SamplingError
from parrot_actors.messages import SamplingParams


async def gen(engine, cid, sampling, prompt=(3, 4, 5, 6)):
    await engine.fill(cid, token_ids=list(prompt))
    result = await engine.generate(cid, sampling)
    await engine.free_context(cid)
    return result


async def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    sp = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True
    )
    alone = await gen(tiny_engine, "a", sp)
    crowd = await asyncio.gather(
        gen(tiny_engine, "b", sp),
        *[
            gen(tiny_engine, f"n{i}", SamplingParams(temperature=1.0, max_tokens=12))
            for i in range(3)
        ],
    )
    assert crowd[0].token_ids == alone.token_ids
    other = await gen(
        tiny_engine,
        "c",
        SamplingParams(
            temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=12, ignore_eos=True
        ),
    )
    assert other.token_ids != alone.token_ids


async def test_top_k_one_is_greedy(tiny_engine):
    greedy = await gen(tiny_engine, "g", SamplingParams(max_tokens=10, ignore_eos=True))
    topk = await gen(
        tiny_engine,
        "k",
        SamplingParams(temperature=0.7, top_k=1, seed=5, max_tokens=10, ignore_eos=True),
    )
    assert topk.token_ids == greedy.token_ids
    assert greedy.finish_reason == "length" and greedy.completion_tokens == 10


def test_sample_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sp = SamplingParams(temperature=1.0, top_p=0.7)
    gen = torch.Generator().manual_seed(0)
    seen = {sample(logits, sp, gen) for _ in range(200)}
    assert seen == {0, 1}
    assert sample(logits, SamplingParams(), None) == 0


def test_sample_rows_draws_each_row_as_alone():
    # One batched call over rows of every kind gives each row the token `sample` gives it
    # alone, draw after draw, and -1 for a NaN row, which does not disturb the others.
    params = [
        SamplingParams(),  # greedy
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.3, top_k=5, seed=2),
        SamplingParams(temperature=1.0, top_p=0.5, seed=3),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.8, seed=4),
        SamplingParams(temperature=1e-300, seed=5),
        SamplingParams(temperature=1.0, seed=6),  # its row is NaN
    ]
    logits = torch.randn(len(params), 300, generator=torch.Generator().manual_seed(0)) * 3
    logits[6, 17] = float("nan")

    def gens() -> list[torch.Generator | None]:
        return [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]

    batched, alone = gens(), gens()
    seen: list[set[int]] = [set() for _ in params]
    for _ in range(20):
        got = sample_rows(logits, params, batched)
        assert got[6] == -1
        for r in range(6):
            assert got[r] == sample(logits[r], params[r], alone[r])
            seen[r].add(got[r])
    # Greedy, and a vanishing temperature: always the row's best token.
    assert (seen[0], seen[5]) == ({int(logits[0].argmax())}, {int(logits[5].argmax())})
    assert len(seen[1]) > 1 and len(seen[2]) > 1  # real draws
    assert seen[2] <= set(torch.topk(logits[2], 5).indices.tolist())
    with pytest.raises(SamplingError, match="logits contain NaN"):
        sample(logits[6], params[6], alone[6])
    # A subset of the rows, in another order: the same tokens as each row alone again.
    sub = [4, 1]
    once, solo = gens(), gens()
    got = sample_rows(logits[sub], [params[i] for i in sub], [once[i] for i in sub])
    assert got == [sample(logits[i], params[i], solo[i]) for i in sub]


async def test_stop_token_and_stop_string(tiny_engine):
    free = await gen(tiny_engine, "f", SamplingParams(max_tokens=12, ignore_eos=True))
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    stopped = await gen(tiny_engine, "s", SamplingParams(max_tokens=12, stop_token_ids=(stop_id,)))
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop"
    text = free.text
    needle = text[len(text) // 2 : len(text) // 2 + 3]
    if needle.strip():
        by_string = await gen(
            tiny_engine, "t", SamplingParams(max_tokens=12, ignore_eos=True, stop=(needle,))
        )
        assert by_string.finish_reason == "stop"
        assert by_string.text == text[: text.index(needle)]


async def test_streaming_yields_the_same_tokens_and_text(tiny_engine):
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    whole = await gen(tiny_engine, "w", sp)
    await tiny_engine.fill("st", token_ids=[3, 4, 5, 6])
    deltas = [d async for d in tiny_engine.generate_stream("st", sp)]
    assert [d.token_id for d in deltas] == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == "length" and all(
        d.finish_reason is None and d.result is None for d in deltas[:-1]
    )
    last = deltas[-1].result
    assert (last.token_ids, last.text, last.finish_reason) == (
        whole.token_ids,
        whole.text,
        "length",
    )
    await tiny_engine.free_context("st")


async def test_closing_a_stream_early_cancels_and_frees(tiny_engine):
    await tiny_engine.fill("c", token_ids=[3, 4, 5, 6])
    stream = tiny_engine.generate_stream("c", SamplingParams(max_tokens=400, ignore_eos=True))
    async for _ in stream:
        break
    await stream.aclose()
    await tiny_engine.free_context("c")
    await tiny_engine.flush()
    assert tiny_engine.stats().running == 0
    assert tiny_engine.stats().kv_blocks_used == 0


async def test_fill_generate_alternate_on_one_context(tiny_engine):
    await tiny_engine.fill("m", token_ids=[3, 4, 5])
    a = await tiny_engine.generate("m", SamplingParams(max_tokens=4, ignore_eos=True))
    await tiny_engine.fill("m", token_ids=[7, 8])
    b = await tiny_engine.generate("m", SamplingParams(max_tokens=4, ignore_eos=True))
    await tiny_engine.free_context("m")
    flat = await gen(
        tiny_engine,
        "flat",
        SamplingParams(max_tokens=4, ignore_eos=True),
        prompt=[3, 4, 5, *a.token_ids, 7, 8],
    )
    assert b.token_ids == flat.token_ids
    assert b.prompt_tokens == 3 + 4 + 2


async def test_tiny_temperature_samples_the_best_token(tiny_engine):
    greedy = await gen(tiny_engine, "g0", SamplingParams(max_tokens=6, ignore_eos=True))
    tiny = await gen(
        tiny_engine, "t0", SamplingParams(temperature=1e-9, seed=3, max_tokens=6, ignore_eos=True)
    )
    assert tiny.token_ids == greedy.token_ids
