"""Summaries of a mode's records and the ratios between modes.

End-to-end latency per app (mean, p50, p90, p99; seconds), normalized latency (an app's
latency divided by its output tokens: seconds per token, the paper's chat metric, Fig. 16/18),
throughput (generated tokens per second of the run's makespan), TTFT and TPOT per call, and
prefill tokens computed vs reused. Speedup = baseline / Parrot of the mean latency (Parrot §8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from scenarios.records import ModeResult


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) by linear interpolation between closest ranks (numpy's
    default); NaN for no values. Raises `ValueError` for q outside [0, 100]."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q}: must be in [0, 100]")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for no values."""
    return sum(values) / len(values) if values else math.nan


class Summary(msgspec.Struct, kw_only=True):
    """One mode's numbers for one app kind (or all apps: kind "all"). Latencies in seconds,
    normalized latency in seconds per output token, throughput in tokens per second."""

    kind: str
    apps: int
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    norm_s_per_token: float
    throughput_tok_s: float
    ttft_mean_s: float
    ttft_p99_s: float
    tpot_mean_s: float
    prefill_tokens: float
    reused_tokens: float
    generated_tokens: float


def summarize(result: ModeResult, kind: str = "all") -> Summary:
    """The summary of `result` over apps of `kind` ("all": every app). Call timings and token
    counters are the whole mode's."""
    apps = [a for a in result.apps if kind in ("all", a.kind)]
    lat = [a.e2e_s for a in apps]
    norm = [a.e2e_s / a.output_tokens for a in apps if a.output_tokens > 0]
    calls = result.calls
    tpot = [c.tpot_s for c in calls if c.completion_tokens > 1]
    t = result.tokens
    # A server without known counters: NaN, which the tables show as n/a.
    known = t.source != "n/a"
    return Summary(
        kind=kind,
        apps=len(apps),
        mean_s=mean(lat),
        p50_s=percentile(lat, 50),
        p90_s=percentile(lat, 90),
        p99_s=percentile(lat, 99),
        norm_s_per_token=mean(norm),
        throughput_tok_s=(
            t.generated_tokens / result.wall_s if result.wall_s > 0 and known else math.nan
        ),
        ttft_mean_s=mean([c.ttft_s for c in calls]),
        ttft_p99_s=percentile([c.ttft_s for c in calls], 99),
        tpot_mean_s=mean(tpot),
        prefill_tokens=t.prefill_tokens if known else math.nan,
        reused_tokens=t.reused_tokens if known else math.nan,
        generated_tokens=t.generated_tokens if known else math.nan,
    )


def kinds(results: Sequence[ModeResult]) -> list[str]:
    """App kinds present, in first-seen order, plus "all" first when there are several."""
    seen = list(dict.fromkeys(a.kind for r in results for a in r.apps))
    return ["all", *seen] if len(seen) > 1 else seen


def speedups(
    results: Sequence[ModeResult], kind: str, metric: str = "mean_s", reference: str = "parrot"
) -> dict[str, float]:
    """other / reference of `metric` (a `Summary` field, lower is better) for every label but
    the reference one ("parrot" unless the scenario names another), over apps of `kind`.
    Empty without a result of the reference label."""
    parrot = next((r for r in results if r.label == reference), None)
    if parrot is None:
        return {}
    p = getattr(summarize(parrot, kind), metric)
    out = {}
    for r in results:
        if r.label != reference:
            b = getattr(summarize(r, kind), metric)
            out[r.label] = b / p if p and p > 0 else math.nan
    return out


def compare_outputs(results: Sequence[ModeResult]) -> tuple[int, list[str]]:
    """(keys compared, keys whose text differs between any two modes or is missing in one):
    greedy decoding must give every mode the same text for the same inputs."""
    if len(results) < 2:
        return 0, []
    keys = sorted(set().union(*(r.outputs for r in results)))
    bad = [k for k in keys if len({r.outputs.get(k) for r in results}) != 1]
    return len(keys), bad
