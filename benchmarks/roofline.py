"""The machine's limits for the engine benchmark: memory read bandwidth and fp32 GEMM rate,
and the roofline bound of a decode or prefill cell from them.

Roofline model (Williams, Waterman and Patterson, CACM 2009): a step takes at least
max(bytes moved / bandwidth, flops / peak rate). For a dense decoder, one decode step of a
batch of B sequences reads every weight once (B tokens share the read) and does about
2 x parameters x B flops; a prefill of N tokens does about 2 x parameters x N flops plus the
causal attention's 2 x N^2 x hidden x layers (QK^T and PV, half of each masked away), and
reads the weights once. KV-cache traffic is left out: at the benchmark's lengths (<= 96
tokens per decode sequence) it is under 1% of the weight bytes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Machine:
    """Measured limits: `read_gb_s` (GB/s, 1e9 bytes, reading a large fp32 tensor once) and
    `gemm_gflop_s` (GFLOP/s, fp32 square matmul), with torch's current thread count."""

    read_gb_s: float
    gemm_gflop_s: float
    threads: int


@dataclass(frozen=True)
class ModelShape:
    """What the bound needs of a model: `params` (count, embeddings included once: tied
    weights are read once per step), `bytes_per_param`, `hidden` and `layers`."""

    params: int
    bytes_per_param: int
    hidden: int
    layers: int


def measure(read_mib: int = 512, gemm_n: int = 2048, repeats: int = 5) -> Machine:
    """The best of `repeats` timings of a sum over `read_mib` MiB of fp32 (bandwidth) and of a
    `gemm_n`-square fp32 matmul (compute), on the CPU. Takes about a second."""
    big = torch.ones(read_mib << 18, dtype=torch.float32)  # read_mib MiB
    a = torch.randn(gemm_n, gemm_n)
    b = torch.randn(gemm_n, gemm_n)
    best_read = best_gemm = float("inf")
    big.sum()
    torch.mm(a, b)
    for _ in range(repeats):
        t0 = time.perf_counter()
        big.sum()
        best_read = min(best_read, time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.mm(a, b)
        best_gemm = min(best_gemm, time.perf_counter() - t0)
    return Machine(
        read_gb_s=big.numel() * 4 / best_read / 1e9,
        gemm_gflop_s=2 * gemm_n**3 / best_gemm / 1e9,
        threads=torch.get_num_threads(),
    )


def cpu_jiffies(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(steal, total) CPU time of all cores so far, in jiffies, from Linux's `/proc/stat`
    (the `cpu` line: user nice system idle iowait irq softirq steal ...); None where there is
    no such file. Steal is time the hypervisor ran something else while this machine's vCPUs
    wanted to run: on a shared host it slows every column of a cell alike."""
    try:
        with open(stat) as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    return fields[7], sum(fields)


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Percent of the CPU time between two `cpu_jiffies` readings that was stolen (None when
    either reading is missing or no time passed)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def median_machine(probes: list[Machine]) -> Machine:
    """The median read rate and the median GEMM rate of several `measure()` probes (each
    median taken alone). Why: on a shared host both rates move by tens of percent within
    minutes, so the benchmark probes beside each cell and bounds the cell by the machine it
    ran on. Raises `ValueError` when `probes` is empty."""
    if not probes:
        raise ValueError("median_machine needs at least one probe, got none")
    return Machine(
        read_gb_s=statistics.median(p.read_gb_s for p in probes),
        gemm_gflop_s=statistics.median(p.gemm_gflop_s for p in probes),
        threads=probes[0].threads,
    )


def decode_bound(shape: ModelShape, machine: Machine, batch: int) -> float:
    """Roofline tokens/s of decode at `batch` sequences (tokens per second, all sequences)."""
    step_s = max(
        shape.params * shape.bytes_per_param / (machine.read_gb_s * 1e9),
        2 * shape.params * batch / (machine.gemm_gflop_s * 1e9),
    )
    return batch / step_s


def prefill_bound(shape: ModelShape, machine: Machine, tokens: int) -> float:
    """Roofline tokens/s of one prefill of `tokens` tokens."""
    flops = 2 * shape.params * tokens + 2 * tokens**2 * shape.hidden * shape.layers
    step_s = max(
        shape.params * shape.bytes_per_param / (machine.read_gb_s * 1e9),
        flops / (machine.gemm_gflop_s * 1e9),
    )
    return tokens / step_s
