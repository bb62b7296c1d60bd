"""What a bench run leaves: a table on stdout, a JSON of every request's timings, a PNG plot."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import TextIO

import msgspec

from scenarios.metrics import compare_outputs, kinds, speedups, summarize
from scenarios.records import ModeResult

_ROWS = [
    ("apps", "apps", "{:.0f}"),
    ("e2e mean (s)", "mean_s", "{:.2f}"),
    ("e2e p50 (s)", "p50_s", "{:.2f}"),
    ("e2e p90 (s)", "p90_s", "{:.2f}"),
    ("e2e p99 (s)", "p99_s", "{:.2f}"),
    ("normalized (s/token)", "norm_s_per_token", "{:.3f}"),
    ("throughput (tok/s)", "throughput_tok_s", "{:.1f}"),
    ("TTFT mean (s)", "ttft_mean_s", "{:.2f}"),
    ("TTFT p99 (s)", "ttft_p99_s", "{:.2f}"),
    ("TPOT mean (s)", "tpot_mean_s", "{:.3f}"),
    ("prefill computed (tok)", "prefill_tokens", "{:.0f}"),
    ("prefill reused (tok)", "reused_tokens", "{:.0f}"),
    ("generated (tok)", "generated_tokens", "{:.0f}"),
]


def commit() -> str:
    """The repository's commit (short hash, "+dirty" with uncommitted changes to tracked
    files other than the report's own outputs, README.md and docs/, which a report rewrites
    while it runs), or "unknown" outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--"]
            + [".", ":(exclude)docs", ":(exclude)README.md"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def machine() -> str:
    """A one-line description of this machine (CPU, cores, Python, torch)."""
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def _fmt(fmt: str, v: float) -> str:
    return "n/a" if isinstance(v, float) and math.isnan(v) else fmt.format(v)


def reference(name: str) -> str:
    """The label speedups are relative to: the scenario's `REFERENCE`, else "parrot"."""
    from scenarios import load

    return str(getattr(load(name), "REFERENCE", "parrot"))


def print_table(name: str, results: list[ModeResult], out: TextIO) -> None:
    """The metrics of every mode side by side, per app kind, with speedups (other mode /
    the reference mode, `reference(name)`)."""
    labels = [r.label for r in results]
    ref = reference(name)
    width = max(24, *(len(x) + 2 for x in labels))
    for kind in kinds(results):
        out.write(f"\n{name} — apps: {kind}\n")
        out.write(f"{'':<24}" + "".join(f"{x:>{width}}" for x in labels) + "\n")
        sums = [summarize(r, kind) for r in results]
        for title, field, fmt in _ROWS:
            cells = "".join(f"{_fmt(fmt, getattr(s, field)):>{width}}" for s in sums)
            out.write(f"{title:<24}{cells}\n")
        for metric, title in (
            ("mean_s", "speedup (mean e2e)"),
            ("norm_s_per_token", "speedup (normalized)"),
        ):
            sp = speedups(results, kind, metric, ref)
            if sp:
                cells = "".join(
                    f"{'1.00x' if x == ref else _fmt('{:.2f}x', sp[x]):>{width}}" for x in labels
                )
                out.write(f"{title:<24}{cells}\n")
    derived = _derived(name, results)
    if derived:
        out.write(f"\n{name} — derived\n")
        for title in derived[0]:
            cells = "".join(
                f"{_fmt('{:.0f}' if float(d[title]).is_integer() else '{:.2f}', d[title]):>{width}}"
                for d in derived
            )
            out.write(f"{title:<24}{cells}\n")
    for r in results:
        if r.server:
            sv = r.server
            out.write(
                f"{r.label}: {sv.get('name')} {sv.get('version')} at {sv.get('url')}, model "
                f"{sv.get('model')}; token counters: {r.tokens.source}\n"
            )
    compared, bad = compare_outputs(results)
    if compared:
        verdict = "identical" if not bad else f"{len(bad)} differ: {bad[:5]}"
        out.write(f"\ngreedy outputs of {compared} calls across modes: {verdict}\n")


def report_dict(name: str, argv: list[str], results: list[ModeResult]) -> dict:
    """The JSON body: scenario, flags, machine, each mode's records and summaries, speedups,
    and the output comparison."""
    compared, bad = compare_outputs(results)
    return {
        "scenario": name,
        "argv": argv,
        "machine": machine(),
        "commit": commit(),
        "modes": {
            r.label: {
                "result": msgspec.to_builtins(r),
                "summary": {k: msgspec.to_builtins(summarize(r, k)) for k in kinds(results)},
            }
            for r in results
        },
        "speedup": {
            k: {m: speedups(results, k, m, reference(name)) for m in ("mean_s", "norm_s_per_token")}
            for k in kinds(results)
        },
        "derived": dict(zip([r.label for r in results], _derived(name, results), strict=True))
        if _derived(name, results)
        else {},
        "outputs_compared": compared,
        "outputs_differ": bad,
    }


def _derived(name: str, results: list[ModeResult]) -> list[dict[str, float]]:
    """Each mode's rows from the scenario's `derived(result)`, if it has one."""
    from scenarios import load

    fn = getattr(load(name), "derived", None)
    return [fn(r) for r in results] if fn is not None else []


def write_json(path: Path, body: dict) -> None:
    """Write `body` as indented JSON (NaN as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(_nan_free(body)), indent=1))


def _nan_free(x: object) -> object:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_free(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_free(v) for v in x]
    return x


def plot(path: Path, name: str, results: list[ModeResult]) -> None:
    """A PNG: mean and p90 end-to-end latency per mode and app kind (bars), and every LLM
    call's latency sorted (one line per mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = kinds(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        sums = [summarize(r, k) for k in ks]
        xs = [j + i * w for j in range(len(ks))]
        ax1.bar(xs, [s.mean_s for s in sums], w, label=f"{r.label} mean")
        ax1.scatter(xs, [s.p90_s for s in sums], marker="_", s=200, color="black")
        lat = sorted(c.e2e_s for c in r.calls)
        ax2.plot(range(1, len(lat) + 1), lat, marker=".", label=r.label)
    ax1.set_xticks([j + w * (len(results) - 1) / 2 for j in range(len(ks))], ks)
    ax1.set_ylabel("end-to-end latency (s); bar: mean, tick: p90")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("LLM calls, sorted by latency")
    ax2.set_ylabel("LLM call latency (s)")
    ax2.legend(fontsize=8)
    fig.suptitle(name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
