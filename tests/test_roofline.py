"""The engine benchmark's roofline bound (benchmarks/roofline.py), exact on round numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from roofline import (  # noqa: E402
    Machine,
    ModelShape,
    cpu_jiffies,
    decode_bound,
    measure,
    median_machine,
    prefill_bound,
    steal_percent,
)

# 1 GB of weights, 10 GB/s: a weight read takes 0.1 s; 100 GFLOP/s: 5e8 flops per token.
SHAPE = ModelShape(params=250_000_000, bytes_per_param=4, hidden=1000, layers=10)
MACHINE = Machine(read_gb_s=10.0, gemm_gflop_s=100.0, threads=2)


def test_decode_is_bandwidth_bound_small_and_compute_bound_large():
    assert decode_bound(SHAPE, MACHINE, 1) == pytest.approx(10.0)  # 1 token / 0.1 s
    assert decode_bound(SHAPE, MACHINE, 20) == pytest.approx(200.0)  # 0.1 s both ways
    assert decode_bound(SHAPE, MACHINE, 32) == pytest.approx(200.0)  # 32 / 0.16 s of flops


def test_prefill_counts_the_causal_attention():
    # 2 * 2.5e8 * 1000 + 2 * 1000^2 * 1000 * 10 = 5.2e11 flops = 5.2 s.
    assert prefill_bound(SHAPE, MACHINE, 1000) == pytest.approx(1000 / 5.2)
    # Two tokens: 1e9 flops (0.01 s) < the weight read (0.1 s).
    assert prefill_bound(SHAPE, MACHINE, 2) == pytest.approx(20.0)


def test_measuring_the_machine_gives_finite_rates():
    m = measure(read_mib=8, gemm_n=128, repeats=2)
    assert 0.1 < m.read_gb_s < 10_000 and 0.1 < m.gemm_gflop_s < 100_000
    assert m.threads >= 1


def test_a_cell_is_bounded_by_the_median_of_its_probes():
    probes = [Machine(30.0, 180.0, 2), Machine(45.0, 100.0, 2), Machine(60.0, 140.0, 2)]
    assert median_machine(probes) == Machine(read_gb_s=45.0, gemm_gflop_s=140.0, threads=2)
    # An even count averages the middle two, each rate on its own.
    assert median_machine(probes[:2]) == Machine(read_gb_s=37.5, gemm_gflop_s=140.0, threads=2)
    with pytest.raises(ValueError, match="at least one probe"):
        median_machine([])


def test_steal_is_read_from_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n")
    assert cpu_jiffies(str(stat)) == (40, 1000)
    assert steal_percent((40, 1000), (70, 1200)) == pytest.approx(15.0)
    assert steal_percent(None, (70, 1200)) is None
    assert steal_percent((40, 1000), (40, 1000)) is None  # no time passed
    assert cpu_jiffies(str(tmp_path / "missing")) is None
    stat.write_text("cpu  1 2 3\n")
    assert cpu_jiffies(str(stat)) is None  # too few fields
