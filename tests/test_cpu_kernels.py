"""The packed CPU kernel: layout, exact results, the runner and engine switch, build failure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parrot_actors.cuda.layout import BatchLayout, SeqLayout
from parrot_actors.cuda.torch_backend import TorchAttention
from parrot_actors.engines import Engine, EngineConfig, cpu_kernels, llama
from parrot_actors.engines.cpu_kernels import (
    PackedWeight,
    add_rms_norm_,
    kernel_status,
    load_kernels,
    pack_weight,
    pack_weight_int8,
    packed_linear,
    paged_decode_attention,
    rms_norm,
    rope_store_kv_,
    silu_mul,
)
from parrot_actors.engines.llama import LlamaRunner
from parrot_actors.engines.model_loader import random_model
from parrot_actors.errors import EngineError
from parrot_actors.messages import SamplingParams
from tests.conftest import TINY, tiny_config


@pytest.fixture(scope="module")
def kernels() -> None:
    assert load_kernels(), kernel_status()


def test_pack_weight_layout_is_16_column_panels() -> None:
    w = torch.arange(3 * 2, dtype=torch.float32).view(3, 2)  # [out 3, in 2]
    p = pack_weight(w)
    assert (p.out_features, p.in_features) == (3, 2)
    assert p.panels.shape == (1, 2, 16)
    # panels[block, k, j] = w[16 * block + j, k]; columns past out_features are zero.
    assert p.panels[0, :, :3].tolist() == [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
    assert p.panels[0, :, 3:].abs().sum().item() == 0.0


def test_pack_weight_refuses_other_dtypes() -> None:
    with pytest.raises(EngineError, match="float32 CPU matrix"):
        pack_weight(torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(EngineError, match="float32 CPU matrix"):
        pack_weight(torch.zeros(4))


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 48, 50, 97])
@pytest.mark.parametrize("n,k", [(1, 3), (16, 16), (17, 70), (100, 33)])
def test_packed_linear_equals_matmul_exactly(kernels: None, m: int, n: int, k: int) -> None:
    # Small integers: every partial sum is exact in float32, so any order of summation must
    # give the same bits; a wrong tile, panel or row offset cannot hide in rounding.
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randint(-3, 4, (m, k), generator=gen).float()
    w = torch.randint(-3, 4, (n, k), generator=gen).float()
    y = packed_linear(x, pack_weight(w))
    assert y.shape == (m, n)
    assert torch.equal(y, x @ w.T)


def test_packed_linear_takes_a_noncontiguous_input(kernels: None) -> None:
    x = torch.randn(8, 40)[:, :32]  # a view with row stride 40
    w = torch.randn(20, 32)
    torch.testing.assert_close(packed_linear(x, pack_weight(w)), F.linear(x, w))


def test_packed_linear_rejects_mismatched_shapes(kernels: None) -> None:
    with pytest.raises(RuntimeError, match="wp must be"):
        packed_linear(torch.zeros(2, 5), pack_weight(torch.zeros(3, 4)))
    with pytest.raises(RuntimeError, match="x must be"):
        packed_linear(torch.zeros(2, 4, dtype=torch.float64), pack_weight(torch.zeros(3, 4)))


def test_pack_weight_int8_scales_and_rounds_per_column() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])  # [out 2, in 3]
    p = pack_weight_int8(w)
    assert p.panels.dtype == torch.int8 and p.panels.shape == (1, 3, 16)
    assert p.scales is not None and p.scales.shape == (16,)
    # Row 0: absmax 2 -> scale 2/127; 1 / (2/127) = 63.5 rounds to even 64. Row 1 is all zero:
    # scale 1. Padded columns have scale 0.
    assert p.scales[:2].tolist() == [pytest.approx(2 / 127), 1.0]
    assert p.scales[2:].abs().sum().item() == 0.0
    assert p.panels[0, :, 0].tolist() == [64, -127, 32]
    assert p.panels[0, :, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("m", [1, 6, 7, 50])
@pytest.mark.parametrize("n,k", [(1, 3), (17, 70), (100, 33)])
def test_packed_linear_int8_equals_dequantized_matmul(
    kernels: None, m: int, n: int, k: int
) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randint(-3, 4, (m, k), generator=gen).float()
    w = torch.randn(n, k, generator=gen)
    p = pack_weight_int8(w)
    assert p.scales is not None
    q = p.panels.transpose(1, 2).reshape(-1, k)[:n].float()  # [n, k] integer values
    # Integer products sum exactly; the kernel then scales each column once, as here.
    assert torch.equal(packed_linear(x, p), (x @ q.T) * p.scales[:n])
    # And the quantization error is what int8 allows: at most half a step per weight.
    assert (q * p.scales[:n, None] - w).abs().max().item() <= p.scales.max().item() / 2 + 1e-7


def _rms_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# 2 x 8 stays on one thread; 600 x 64 splits rows across threads (grain 16384 elements).
@pytest.mark.parametrize("t,h", [(1, 3), (2, 8), (5, 576), (600, 64)])
def test_rms_norm_and_fused_residual_add(kernels: None, t: int, h: int) -> None:
    gen = torch.Generator().manual_seed(t * 100 + h)
    x, d, w = torch.randn(t, h, generator=gen), torch.randn(t, h, generator=gen), torch.randn(h)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), _rms_reference(x, w, 1e-5))
    # Exactly RMS for a row of equal values: x / |x| * w.
    assert rms_norm(torch.full((1, 4), -3.0), torch.arange(4.0), 0.0).tolist() == [
        [-0.0, -1.0, -2.0, -3.0]
    ]
    y = x.clone()
    out = add_rms_norm_(y, d, w, 1e-6)
    assert torch.equal(y, x + d)  # the residual stream, updated in place, exact
    torch.testing.assert_close(out, _rms_reference(x + d, w, 1e-6))
    with pytest.raises(RuntimeError, match=f"w has {h + 1} elements"):
        rms_norm(x, torch.ones(h + 1), 1e-5)


@pytest.mark.parametrize("t,i", [(1, 5), (3, 1536), (40, 600)])
def test_silu_mul_equals_torch(kernels: None, t: int, i: int) -> None:
    gen = torch.Generator().manual_seed(t + i)
    gu = torch.randn(t, 2 * i, generator=gen) * 8
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gu), F.silu(gate) * up, rtol=1e-6, atol=1e-30)
    # The vector exp's clamps: far tails give silu(-100) ~ 0 and silu(100) = 100, never nan.
    edge = silu_mul(torch.tensor([[-100.0, 0.0, 100.0, -1e30] * 2 + [1.0] * 8]))
    assert edge[0, :4].tolist() == [pytest.approx(0.0, abs=1e-30), 0.0, 100.0, -0.0]
    with pytest.raises(RuntimeError, match="even number of columns"):
        silu_mul(torch.zeros(2, 3))


def test_rope_store_kv_rotates_in_place_and_writes_the_cache(kernels: None) -> None:
    n_q, n_kv, hd, bs = 4, 2, 8, 4
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(3, (n_q + 2 * n_kv) * hd, generator=gen)
    angles = torch.randn(10, hd // 2, generator=gen)
    cos = torch.cat([angles.cos(), angles.cos()], -1)  # [10, hd]
    sin = torch.cat([angles.sin(), angles.sin()], -1)
    pos = torch.tensor([0, 5, 9])
    cache = torch.zeros(3, 2, bs, n_kv, hd)
    # Token t goes to block 2 - t... slot t: K rows (block * 2) * bs + offset, V bs later.
    blocks, offsets = [2, 0, 1], [3, 0, 1]
    k_rows = [b * 2 * bs + o for b, o in zip(blocks, offsets)]
    slots = torch.tensor(k_rows + [r + bs for r in k_rows])
    before = qkv.clone()
    rope_store_kv_(qkv, pos, cos, sin, cache, slots, n_q, n_kv)
    heads = before.view(3, n_q + 2 * n_kv, hd)
    qk = heads[:, : n_q + n_kv]
    rot = torch.cat([-qk[..., hd // 2 :], qk[..., : hd // 2]], -1)
    want = qk * cos[pos][:, None] + rot * sin[pos][:, None]
    got = qkv.view(3, n_q + 2 * n_kv, hd)
    torch.testing.assert_close(got[:, : n_q + n_kv], want)
    assert torch.equal(got[:, n_q + n_kv :], heads[:, n_q + n_kv :])  # v untouched
    for t, (b, o) in enumerate(zip(blocks, offsets)):
        assert torch.equal(cache[b, 0, o], got[t, n_q : n_q + n_kv])
        assert torch.equal(cache[b, 1, o], got[t, n_q + n_kv :])
    assert int((cache.abs().sum(-1).sum(-1) > 0).sum()) == 6  # nothing else written
    with pytest.raises(RuntimeError, match="position 10 outside"):
        rope_store_kv_(qkv, torch.tensor([0, 1, 10]), cos, sin, cache, slots, n_q, n_kv)
    with pytest.raises(RuntimeError, match="slot outside"):
        rope_store_kv_(qkv, pos, cos, sin, cache, slots + 100, n_q, n_kv)


# Five sequences: one token, a full block, across blocks, a block's remainder; each work item
# takes all kv heads of a sequence. One sequence: one kv head per work item.
@pytest.mark.parametrize("lens", [[1, 4, 5, 17, 30], [30]], ids=["5seqs", "1seq"])
@pytest.mark.parametrize("n_q,n_kv,hd", [(8, 2, 16), (9, 3, 64), (4, 4, 12)])
def test_paged_decode_attention_equals_the_torch_path(
    kernels: None, n_q: int, n_kv: int, hd: int, lens: list[int]
) -> None:
    bs = 4
    gen = torch.Generator().manual_seed(n_q * 10 + hd)
    cache = torch.randn(40, 2, bs, n_kv, hd, generator=gen) * 3
    perm = torch.randperm(40, generator=gen).tolist()
    decodes, used = [], 0
    for n in lens:
        nb = -(-n // bs)
        decodes.append(SeqLayout(1, n, tuple(perm[used : used + nb])))
        used += nb
    layout = BatchLayout(bs, decodes=tuple(decodes))
    qkv = torch.randn(len(lens), (n_q + 2) * hd, generator=gen)
    q = qkv[:, : n_q * hd].view(-1, n_q, hd)  # strided rows, as the runner passes them
    cpu = torch.device("cpu")
    plain = TorchAttention(n_q, n_kv, hd, cpu)
    plain.plan(layout)
    fused = TorchAttention(n_q, n_kv, hd, cpu, decode_kernel=True)
    fused.plan(layout)
    torch.testing.assert_close(
        fused.forward(q, cache), plain.forward(q.contiguous(), cache), atol=1e-5, rtol=1e-5
    )
    tables = torch.zeros(len(lens), 8, dtype=torch.long)
    for row, s in enumerate(decodes):
        tables[row, : len(s.block_table)] = torch.tensor(s.block_table)
    with pytest.raises(RuntimeError, match="lens\\[0\\] = 0 outside"):
        paged_decode_attention(q, cache, tables, torch.tensor([0] + lens[1:]), 0.1)
    tables[-1, 7] = 40
    with pytest.raises(RuntimeError, match="block id 40 outside"):
        paged_decode_attention(q, cache, tables, torch.tensor(lens[:-1] + [32]), 0.1)


def _logits(runner: LlamaRunner, token_ids: list[int]) -> torch.Tensor:
    """Prefill `token_ids` as one sequence, then one decode token: logits of both steps."""
    kv = runner.allocate_kv(4, 16)
    n = len(token_ids)
    table = (0, 1)
    first = BatchLayout(16, prefills=(SeqLayout(n, n, table[: (n + 15) // 16]),))
    a = runner.forward(token_ids, list(range(n)), first, kv, [n - 1])
    nxt = BatchLayout(16, decodes=(SeqLayout(1, n + 1, table[: (n + 16) // 16]),))
    b = runner.forward([int(a.argmax())], [n], nxt, kv, [0])
    return torch.cat([a, b])


def test_runner_with_kernels_matches_torch_linear(kernels: None) -> None:
    loaded = random_model(dict(TINY, hidden_size=96, intermediate_size=160), seed=3)
    cpu = torch.device("cpu")

    def runner(kernels: bool) -> LlamaRunner:
        attention = TorchAttention(4, 2, 24, cpu, decode_kernel=kernels)
        return LlamaRunner(loaded, cpu, torch.float32, attention, kernels)

    packed, plain = runner(True), runner(False)
    assert isinstance(packed.layers[0].qkv, PackedWeight)
    assert isinstance(plain.layers[0].qkv, torch.Tensor)
    ids = [5, 17, 300, 4000, 12, 9, 77, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    torch.testing.assert_close(_logits(packed, ids), _logits(plain, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_decode_step_in_one_call_per_layer_equals_the_op_path(
    kernels: None, int8: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three sequences prefilled, then one decode step run both ways on copies of the cache:
    # whole layers through decoder_layer, and op by op through the backend. Same kernels in
    # the same order, so the logits and the cache agree bit for bit.
    loaded = random_model(dict(TINY, hidden_size=96, intermediate_size=160), seed=5)
    cpu = torch.device("cpu")
    runner = LlamaRunner(
        loaded, cpu, torch.float32, TorchAttention(4, 2, 24, cpu, decode_kernel=True), True, int8
    )
    kv = runner.allocate_kv(12, 4)
    lens, tables = [3, 9, 6], [(0,), (1, 2, 3), (4, 5)]
    prompts = [[7 * i + j for j in range(n)] for i, n in enumerate(lens)]
    fill = BatchLayout(4, prefills=tuple(SeqLayout(n, n, t) for n, t in zip(lens, tables)))
    runner.forward(sum(prompts, []), sum((list(range(n)) for n in lens), []), fill, kv, [0])
    tables[0] = (0, 6)  # the first sequence's fourth token opens a second block
    step = BatchLayout(4, decodes=tuple(SeqLayout(1, n + 1, t) for n, t in zip(lens, tables)))
    args = ([11, 12, 13], lens, step)
    calls = []
    real = llama.decoder_layer
    monkeypatch.setattr(llama, "decoder_layer", lambda *a: calls.append(1) or real(*a))
    kv_fused = [c.clone() for c in kv]
    fused = runner.forward(*args, kv_fused, [0, 1, 2])
    assert len(calls) == runner.num_layers  # the step took the one-call-per-layer path
    monkeypatch.setattr(runner, "_fused_attention", None)
    kv_ops = [c.clone() for c in kv]
    ops = runner.forward(*args, kv_ops, [0, 1, 2])
    assert len(calls) == runner.num_layers
    assert torch.equal(fused, ops)
    assert all(torch.equal(a, b) for a, b in zip(kv_fused, kv_ops))
    assert not torch.equal(kv_fused[0], kv[0])  # the step wrote its K/V


def test_decoder_layer_only_for_decode_steps_and_checks_its_operands(kernels: None) -> None:
    cpu = torch.device("cpu")
    attention = TorchAttention(4, 2, 16, cpu, decode_kernel=True)
    with pytest.raises(RuntimeError, match="before plan"):
        attention.kernel_decode()
    attention.plan(BatchLayout(4, prefills=(SeqLayout(2, 2, (0,)),)))
    assert attention.kernel_decode() is None  # a prefill takes the op path
    attention.plan(BatchLayout(4, decodes=(SeqLayout(1, 5, (3, 1)),)))
    plan = attention.kernel_decode()
    assert plan is not None
    assert plan[0].tolist() == [[3, 1]] and plan[1].tolist() == [5] and plan[2] == 0.25
    torch_only = TorchAttention(4, 2, 16, cpu)
    torch_only.plan(BatchLayout(4, decodes=(SeqLayout(1, 5, (3, 1)),)))
    assert torch_only.kernel_decode() is None  # no decode kernel: it builds a mask instead
    x = torch.zeros(1, 64)
    w = pack_weight(torch.zeros(64, 64))
    ops = cpu_kernels.layer_operands(w, w, w, w)
    ops.weights.pop()
    with pytest.raises(RuntimeError, match="need 4 weights"):
        cpu_kernels.decoder_layer(
            x, x, ops, x[0], None, torch.zeros(2, 2, 4, 2, 16), torch.zeros(1, dtype=torch.long),
            torch.zeros(8, 16), torch.zeros(8, 16), torch.zeros(2, dtype=torch.long),
            plan[0], plan[1], 4, 2, 1e-5, 0.25,
        )  # fmt: skip
    with pytest.raises(EngineError, match="all be int8 or all float32"):
        cpu_kernels.layer_operands(w, w, w, pack_weight_int8(torch.ones(64, 64)))


def test_runner_refuses_kernels_off_cpu_float32() -> None:
    loaded = random_model(dict(TINY), seed=0)
    cpu = torch.device("cpu")
    with pytest.raises(EngineError, match="cpu/float32"):
        LlamaRunner(loaded, cpu, torch.bfloat16, TorchAttention(4, 2, 16, cpu), kernels=True)


async def test_engine_compile_switch(kernels: None) -> None:
    # Tiny models stay eager by default; compile=True turns the kernels on for them too, and
    # greedy tokens are the same either way.
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    out = {}
    for setting in (None, True, False):
        engine = await Engine.start(tiny_config(name=f"c{setting}", compile=setting))
        try:
            runner = engine.core.runner
            assert runner.kernels is (setting is True)
            await engine.fill("a", text="Kernels and the same tokens:")
            out[setting] = (await engine.generate("a", sp)).token_ids
        finally:
            await engine.close()
    assert out[None] == out[True] == out[False]
    assert len(out[True]) == 12


async def test_engine_int8_weights(kernels: None) -> None:
    engine = await Engine.start(tiny_config(name="i8", dtype="int8"))
    try:
        runner = engine.core.runner
        assert runner.kernels and runner.int8
        assert isinstance(runner.lm_head, PackedWeight)
        assert runner.lm_head.panels.dtype == torch.int8
        await engine.fill("a", text="Eight bits:")
        out = await engine.generate("a", SamplingParams(max_tokens=5, ignore_eos=True))
        assert len(out.token_ids) == 5
    finally:
        await engine.close()
    # int8 weights exist only in the kernels: compile=False does not turn them off.
    engine = await Engine.start(tiny_config(name="i8off", dtype="int8", compile=False))
    try:
        assert engine.core.runner.int8 and engine.core.runner.kernels
    finally:
        await engine.close()


async def test_compile_true_on_bfloat16_is_a_typed_error() -> None:
    with pytest.raises(EngineError, match="compile=True"):
        await Engine.start(tiny_config(name="bf", dtype="bfloat16", compile=True))


async def test_failed_build_falls_back_or_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise OSError("no C++ compiler")

    monkeypatch.setattr(cpu_kernels, "_status", None)
    monkeypatch.setattr(cpu_kernels, "_build", broken)
    assert load_kernels() is False
    assert kernel_status() == "unavailable: OSError: no C++ compiler"
    big = dict(TINY, hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    engine = await Engine.start(EngineConfig(name="fallback", random_model=big, compile=None))
    try:
        assert engine.core.runner.kernels is False
    finally:
        await engine.close()
    with pytest.raises(EngineError, match="no C\\+\\+ compiler"):
        await Engine.start(EngineConfig(name="refuse", random_model=big, compile=True))
