"""The packed CPU kernel: layout, exact results, the runner and engine switch, build failure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parrot_actors.cuda.layout import BatchLayout, SeqLayout
from parrot_actors.cuda.torch_backend import TorchAttention
from parrot_actors.engines import Engine, EngineConfig, cpu_kernels
from parrot_actors.engines.cpu_kernels import (
    PackedWeight,
    kernel_status,
    load_kernels,
    pack_weight,
    pack_weight_int8,
    packed_linear,
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
        return LlamaRunner(loaded, cpu, torch.float32, TorchAttention(4, 2, 24, cpu), kernels)

    packed, plain = runner(True), runner(False)
    assert isinstance(packed.layers[0].qkv, PackedWeight)
    assert isinstance(plain.layers[0].qkv, torch.Tensor)
    ids = [5, 17, 300, 4000, 12, 9, 77, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    torch.testing.assert_close(_logits(packed, ids), _logits(plain, ids), atol=1e-4, rtol=1e-4)


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
    # int8 weights exist only in the kernels: the default compile=False does not turn them off.
    assert EngineConfig().compile is False


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
