"""FlashInfer backend against the torch reference on a CUDA GPU (skipped without CUDA+flashinfer).

Random K/V caches and random block tables (drawn from a shuffled block-id permutation, so pages
are scattered), prefill / plain decode / cascade decode / mixed steps, GQA and MHA head shapes.
Tolerance is bf16's (atol = rtol = 2e-2): FlashInfer accumulates in fp32 but rounds the softmax
probabilities to the input dtype before the PV product; the reference does all math in fp32.
The engine tests run a full greedy generation with both backends (same seeded random weights).
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from parrot_actors.cuda import flashinfer_available
from parrot_actors.cuda.layout import BatchLayout, SeqLayout, plan_cascade
from parrot_actors.cuda.torch_backend import TorchAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and flashinfer_available()),
        reason="needs a CUDA device and the flashinfer package",
    ),
]

BS = 16  # page (block) size
TOL = {"atol": 2e-2, "rtol": 2e-2}
SHAPES = [(32, 8, 128), (9, 3, 64)]  # (q heads, kv heads, head_dim)


class _Blocks:
    """Hands out block ids from a shuffled permutation of `[0, num_blocks)`."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.ids = list(range(num_blocks))
        random.Random(seed).shuffle(self.ids)
        self.next = 0

    def take(self, n: int) -> tuple[int, ...]:
        out = tuple(self.ids[self.next : self.next + n])
        if len(out) != n:
            raise RuntimeError("test KV cache too small")
        self.next += n
        return out

    def seq(self, query_len: int, kv_len: int, prefix: tuple[int, ...] = ()) -> SeqLayout:
        return SeqLayout(query_len, kv_len, prefix + self.take(-(-kv_len // BS) - len(prefix)))


def _run_both(
    layout: BatchLayout, heads: tuple[int, int, int], dtype: torch.dtype, num_blocks: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    from parrot_actors.cuda.flashinfer_backend import FlashInferAttention

    hq, hkv, d = heads
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    kv = torch.randn(num_blocks, 2, BS, hkv, d, device=dev, generator=gen).to(dtype)
    q = torch.randn(layout.num_tokens, hq, d, device=dev, generator=gen).to(dtype)
    fi = FlashInferAttention(hq, hkv, d, dev, dtype)
    fi.plan(layout)
    got = fi.forward(q, kv)
    # Planned once, run twice (as for two layers): same result.
    torch.testing.assert_close(fi.forward(q, kv), got, atol=1e-3, rtol=0)
    ref = TorchAttention(hq, hkv, d, dev)
    ref.plan(layout)
    want = ref.forward(q, kv)
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.isfinite(got.float()).all()
    return got, want


@pytest.mark.parametrize("heads", SHAPES)
def test_prefill_matches_torch(heads: tuple[int, int, int]) -> None:
    blocks = _Blocks(256, seed=1)
    # Fresh prompts, a page-boundary one, chunked/forked fills (query_len < kv_len), one token.
    lens = [(37, 37), (16, 16), (5, 100), (1, 1), (64, 200), (128, 128)]
    layout = BatchLayout(BS, prefills=tuple(blocks.seq(q, kv) for q, kv in lens))
    got, want = _run_both(layout, heads, torch.bfloat16, 256, seed=2)
    torch.testing.assert_close(got.float(), want.float(), **TOL)


@pytest.mark.parametrize("heads", [*SHAPES, (32, 32, 128)])
def test_plain_decode_matches_torch(heads: tuple[int, int, int]) -> None:
    rng = random.Random(3)
    blocks = _Blocks(1024, seed=4)
    kv_lens = [1, 16, 17, 600, 33] + [rng.randint(1, 700) for _ in range(11)]
    layout = BatchLayout(BS, decodes=tuple(blocks.seq(1, n) for n in kv_lens))
    got, want = _run_both(layout, heads, torch.bfloat16, 1024, seed=5)
    torch.testing.assert_close(got.float(), want.float(), **TOL)


def _cascade_decodes(
    group_sizes: tuple[int, ...], prefix_len: int, lone: int, seed: int
) -> tuple[list[SeqLayout], int]:
    """Forked groups: each shares a `prefix_len`-token parent (its full blocks) and adds 1..40
    own tokens; plus `lone` unrelated decodes. Returns (decodes in a shuffled order, blocks)."""
    rng = random.Random(seed)
    num_blocks = 64 + sum(group_sizes) * (prefix_len // BS + 8) + len(group_sizes) * 200
    blocks = _Blocks(num_blocks, seed=seed + 1)
    decodes: list[SeqLayout] = []
    for size in group_sizes:
        shared = blocks.take(prefix_len // BS)
        for _ in range(size):
            decodes.append(blocks.seq(1, prefix_len + rng.randint(1, 40), shared))
    decodes += [blocks.seq(1, rng.randint(1, 300)) for _ in range(lone)]
    rng.shuffle(decodes)
    return decodes, num_blocks


@pytest.mark.parametrize("heads", SHAPES)
@pytest.mark.parametrize("prefix_len", [16, 100, 1000])
@pytest.mark.parametrize("group_sizes", [(2,), (4, 1, 3), (16,)])
def test_cascade_decode_matches_torch_and_plain(
    heads: tuple[int, int, int], prefix_len: int, group_sizes: tuple[int, ...]
) -> None:
    decodes, num_blocks = _cascade_decodes(group_sizes, prefix_len, lone=2, seed=prefix_len)
    ordered, groups = plan_cascade(decodes, BS)
    assert groups, "the layout must actually use cascade"
    cascade = BatchLayout(BS, decodes=tuple(ordered), cascade_groups=tuple(groups))
    got, want = _run_both(cascade, heads, torch.bfloat16, num_blocks, seed=6)
    torch.testing.assert_close(got.float(), want.float(), **TOL)
    # Same decodes without cascade: plain paged decode gives the same attention.
    plain = BatchLayout(BS, decodes=tuple(ordered))
    got_plain, _ = _run_both(plain, heads, torch.bfloat16, num_blocks, seed=6)
    torch.testing.assert_close(got.float(), got_plain.float(), **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_step_matches_torch(dtype: torch.dtype) -> None:
    decodes, num_blocks = _cascade_decodes((3, 5), 300, lone=3, seed=11)
    blocks = _Blocks(num_blocks + 64, seed=12)
    blocks.ids = [i for i in blocks.ids if i >= num_blocks]  # disjoint from the decodes' ids
    prefills = (blocks.seq(20, 20), blocks.seq(7, 70))
    ordered, groups = plan_cascade(decodes, BS)
    layout = BatchLayout(BS, prefills, tuple(ordered), tuple(groups))
    got, want = _run_both(layout, (32, 8, 128), dtype, num_blocks + 64, seed=13)
    torch.testing.assert_close(got.float(), want.float(), **TOL)


# --- Engine: full greedy generation with both backends ----------------------------------------

RANDOM_MODEL = {
    # head_dim = 512 / 8 = 64: FlashInfer has no head_dim-32 kernels (256 / 8 would give 32).
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
}


def _matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def _generate(attention: str, plan_log: list | None = None) -> dict[str, list[int]]:
    from parrot_actors.engines import Engine, EngineConfig
    from parrot_actors.messages import SamplingParams

    cfg = EngineConfig(
        random_model=RANDOM_MODEL, device="cuda", dtype="bfloat16", attention=attention
    )
    engine = await Engine.start(cfg)
    try:
        sp = SamplingParams(max_tokens=32, ignore_eos=True)
        out: dict[str, list[int]] = {}
        await engine.fill("ctx", token_ids=[(7 * i + 3) % 49000 + 1 for i in range(50)])
        out["ctx"] = (await engine.generate("ctx", sp)).token_ids
        await engine.fill("p", token_ids=[(13 * i + 5) % 49000 + 1 for i in range(300)])
        for i in range(8):
            suffix = [1000 + 17 * i + j for j in range(3 + i % 4)]
            await engine.fill(f"c{i}", token_ids=suffix, parent_context_id="p")
        results = await asyncio.gather(*(engine.generate(f"c{i}", sp) for i in range(8)))
        for i, r in enumerate(results):
            out[f"c{i}"] = r.token_ids
        return out
    finally:
        await engine.close()


async def test_engine_greedy_generation_flashinfer_vs_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from parrot_actors.cuda.flashinfer_backend import FlashInferAttention

    layouts: list[BatchLayout] = []
    original = FlashInferAttention.plan

    def spy(self: FlashInferAttention, layout: BatchLayout) -> None:
        layouts.append(layout)
        original(self, layout)

    monkeypatch.setattr(FlashInferAttention, "plan", spy)
    fi = await _generate("flashinfer")
    ref = await _generate("torch")
    cascade_steps = sum(1 for lt in layouts if any(g.shared_blocks for g in lt.cascade_groups))
    report = {k: _matching_prefix(fi[k], ref[k]) for k in ref}
    print(f"matching prefix length per context (of 32): {report}; cascade steps: {cascade_steps}")
    for k in ref:
        assert len(fi[k]) == len(ref[k]) == 32, k
        assert fi[k][:8] == ref[k][:8], (k, fi[k], ref[k])
    # The 8 forked children decode together, so the FlashInfer run must have used cascade.
    assert cascade_steps > 0
