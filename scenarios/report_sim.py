"""The paper's figures at the paper's shapes, in simulated time (`python -m scenarios report`).

Every figure of Parrot's evaluation (Lin et al., OSDI 2024, §8) at its own hardware, model, sizes
and baselines (`../shared/paper_figures.md`, the only source of paper numbers here), each point
one `bench` run over simulated engines (`--sim`: the real service, scheduler and engine core on
the next-event clock; a step lasts what `engines/step_time.py` predicts). The network is the
paper's (`--rtt-dist paper`: 218-345 ms per round trip, half before and half after each
request) except Fig. 14-15, which the paper measured at the engine, without one.

Each point's JSON lands in docs/results/sim/FIGURE/POINT/ (calls and apps dropped: the summaries
stay); `render_section` turns them into the simulated part of docs/results.md and `plot`
draws one PNG per figure in the paper's axes (ours solid, the paper's dashed).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from scenarios.report_sim_beyond import BEYOND_FIGURES
from scenarios.report_sim_figures import PAPER_FIGURES, SHARED, SimFigure

FIGURES = (*PAPER_FIGURES, *BEYOND_FIGURES)
"""Every simulated figure: the paper's, in its order, then the workloads beyond it."""

Bodies = dict[str, dict]
"""One point's bench JSON bodies by run variant."""


def paper_rows(path: Path = SHARED) -> dict[str, list[str]]:
    """The figure table of ../shared/paper_figures.md by figure id ("11a"): [workload, sizes,
    published result], verbatim; empty when the file is absent (a clone without ../shared)."""
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"\d+[ab]?", cells[0]):
            rows[cells[0]] = cells[1:]
    return rows


def point_dir(docs: Path, fig: SimFigure, x: float, variant: str) -> Path:
    """Where one run of `fig` at `x` keeps its JSON (figures that reuse another's runs read
    that one's)."""
    return docs / "results" / "sim" / (fig.runs_of or fig.name) / f"{x:g}-{variant}"


def _argv(fig: SimFigure, flags: list[str], out: Path) -> list[str]:
    return ["bench", fig.scenario, *flags, "--no-progress", "--out", str(out)]


def _slim(path: Path) -> None:
    """Drop the per-call and per-app records (the report reads summaries only) and the
    per-run plot, so that a committed point stays a few KB."""
    body = json.loads(path.read_text())
    for m in body["modes"].values():
        m["result"]["calls"] = []
        m["result"]["apps"] = []
        m["result"]["outputs"] = {}
    path.write_text(json.dumps(body, indent=1))
    path.with_suffix(".png").unlink(missing_ok=True)


def run_figures(docs: Path, only: list[str] | None = None, jobs: int = 2) -> int:
    """Run every point of the simulated figures (those named in `only`, or all) in `jobs`
    processes at once (simulated time does not depend on host speed, so they may share the
    CPU). Returns 0, or the exit status of the first failed run (its command is printed)."""
    todo: list[tuple[SimFigure, list[str], Path]] = []
    for fig in FIGURES:
        if fig.runs_of or (only and fig.name not in only):
            continue
        for x in fig.xs:
            for variant, flags in fig.runs(x).items():
                out = point_dir(docs, fig, x, variant)
                todo.append((fig, flags, out))

    def one(item: tuple[SimFigure, list[str], Path]) -> tuple[int, str]:
        fig, flags, out = item
        argv = _argv(fig, flags, out)
        proc = subprocess.run(
            [sys.executable, "-m", "scenarios", *argv], capture_output=True, text=True
        )
        if proc.returncode == 0:
            _slim(out / f"{fig.scenario}.json")
            (out / "command.txt").write_text("python -m scenarios " + " ".join(argv) + "\n")
        return proc.returncode, " ".join(argv) + "\n" + proc.stderr[-2000:]

    with ThreadPoolExecutor(jobs) as pool:
        for status, what in tqdm(pool.map(one, todo), total=len(todo), desc="simulated points"):
            if status:
                print(f"failed ({status}): {what}")
                return status
    return 0


def load_points(docs: Path, fig: SimFigure) -> list[Bodies]:
    """Each x's bodies by variant (missing runs left out)."""
    out = []
    for x in fig.xs:
        bodies = {}
        for variant in fig.runs(x):
            path = point_dir(docs, fig, x, variant) / f"{fig.scenario}.json"
            if path.exists():
                bodies[variant] = json.loads(path.read_text())
        out.append(bodies)
    return out


def values(fig: SimFigure, points: list[Bodies]) -> list[list[float]]:
    """Ours: [series][x], NaN where a point did not run or has no such mode."""
    table = []
    for s in fig.series:
        row = []
        for bodies in points:
            try:
                row.append(float(s.get(bodies)))
            except (KeyError, TypeError, ZeroDivisionError):
                row.append(math.nan)
        table.append(row)
    return table


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def _fmt(v: float | str | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v + unit if unit == "x" and v[:1].isdigit() else v
    if math.isnan(v):
        return "-"
    text = f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return text + unit


def _diff(ours: float, paper: float) -> str:
    """Ours relative to the paper's number, in percent ("-" where either is missing)."""
    if math.isnan(ours) or math.isnan(paper) or not paper:
        return "-"
    return f"{100 * (ours / paper - 1):+.0f}%"


def sustainable(xs: tuple[float, ...], ys: list[float], threshold: float) -> float:
    """The highest rate of `xs` whose value stays at or under `threshold` with every lower
    measured rate also under it (Parrot Fig. 16's sustainable rate); NaN if none."""
    best = math.nan
    for x, y in sorted(zip(xs, ys)):
        if math.isnan(y):
            continue
        if y > threshold:
            break
        best = x
    return best


def headline(fig: SimFigure, docs: Path) -> tuple[str, str]:
    """(ours, paper) of the figure's headline series at its headline x, as text."""
    if fig.headline is None:
        return "-", "-"
    i, j = fig.headline
    ours = values(fig, load_points(docs, fig))[i][j]
    s = fig.series[i]
    paper = s.paper[j] if s.paper else None
    return _fmt(ours, s.unit), _fmt(paper, s.unit if not isinstance(paper, str) else "")


def _sustain_lines(fig: SimFigure, table: list[list[float]]) -> list[str]:
    if fig.sustain is None:
        return []
    threshold, parrot, base = fig.sustain
    lines = [f"Highest rate sustained under {threshold:g} ms per output token (req/s):", ""]
    lines += ["| series | ours (simulated) | paper (from its quoted points) |", "|---|---|---|"]
    got: dict[int, tuple[float, float]] = {}
    for i, s in enumerate(fig.series):
        if s.panel != fig.series[parrot].panel:
            continue
        ours = sustainable(fig.xs, table[i], threshold)
        paper = sustainable(fig.xs, [_num(v) for v in s.paper], threshold)
        got[i] = (ours, paper)
        lines.append(f"| {s.label} | {_fmt(ours)} | {_fmt(paper)} |")
    (po, pp), (bo, bp) = got[parrot], got[base]
    lines.append(
        f"| ratio {fig.series[parrot].label} / {fig.series[base].label} | "
        f"{_fmt(po / bo if bo else math.nan, 'x')} | {_fmt(pp / bp if bp else math.nan, 'x')} |"
    )
    return [*lines, ""]


def render_figure(fig: SimFigure, docs: Path, quotes: dict[str, list[str]]) -> list[str]:
    """One figure's markdown: setting, the paper's row quoted, ours beside the paper per x with
    the relative difference, the sustainable rates (Fig. 16), the plot, and why they differ."""
    points = load_points(docs, fig)
    table = values(fig, points)
    name = f"Fig. {fig.figure}" if fig.of_paper else f"Beyond the paper, {fig.figure}"
    out = [f'<a id="fig-{fig.name}"></a>', "", f"### {name}: {fig.title} (simulated)"]
    out += ["", f"Hardware: simulated {fig.hardware}. Setting: {fig.setting}.", ""]
    q = quotes.get(fig.figure)
    if q:
        out += [f"Paper (quoted): {q[0]}; {q[1]}: {q[2]}.", ""]
    header = f"| series | {fig.xlabel} | " + " | ".join(f"{x:g}" for x in fig.xs) + " |"
    out += [header, "|---" * (len(fig.xs) + 2) + "|"]
    for s, row in zip(fig.series, table):
        ours = " | ".join(_fmt(v, s.unit) for v in row)
        out.append(f"| {s.label} | ours | {ours} |")
        if s.paper:
            out.append("| | paper | " + " | ".join(_fmt(v, s.unit) for v in s.paper) + " |")
            diffs = [_diff(o, _num(p)) for o, p in zip(row, s.paper)]
            out.append("| | ours vs paper | " + " | ".join(diffs) + " |")
    out.append("")
    out += _sustain_lines(fig, table)
    if any(points):
        cmd = next(
            (point_dir(docs, fig, x, v) / "command.txt" for x in fig.xs for v in fig.runs(x)),
            None,
        )
        if cmd is not None and cmd.exists():
            out += [f"One point's command: `{cmd.read_text().strip()}`.", ""]
        out += [f"![{name}](results/sim/{fig.name}.png)", ""]
    else:
        out += ["Not run yet.", ""]
    if fig.why:
        why = "Why ours and the paper's differ" if fig.of_paper else "What limits Parrot here"
        out += [f"{why}: {fig.why}", ""]
    return out


def plot(fig: SimFigure, docs: Path) -> None:
    """docs/results/sim/NAME.png: one panel per y axis of the figure; ours solid with dots,
    the paper's dashed with crosses in the same colour; bars for one-point figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = values(fig, load_points(docs, fig))
    panels = list(dict.fromkeys(s.panel for s in fig.series))
    f, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        members = [(i, s) for i, s in enumerate(fig.series) if s.panel == panel]
        if len(fig.xs) == 1:
            labels = [s.label for _, s in members]
            ours = [table[i][0] for i, _ in members]
            paper = [_num(s.paper[0]) if s.paper else math.nan for _, s in members]
            pos = range(len(labels))
            ax.bar([p - 0.2 for p in pos], ours, 0.4, label="ours (simulated)")
            ax.bar([p + 0.2 for p in pos], paper, 0.4, label="paper", hatch="//", alpha=0.6)
            ax.set_xticks(list(pos), labels, rotation=20, ha="right", fontsize=7)
        else:
            for k, (i, s) in enumerate(members):
                color = f"C{k}"
                ax.plot(fig.xs, table[i], "o-", color=color, label=f"{s.label} (ours)")
                if s.paper and any(not math.isnan(_num(v)) for v in s.paper):
                    ys = [_num(v) for v in s.paper]
                    ax.plot(fig.xs, ys, "x--", color=color, label=f"{s.label} (paper)")
            ax.set_xlabel(fig.xlabel)
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    f.suptitle(f"{fig.figure}: {fig.title} — {fig.hardware} (simulated)", fontsize=9)
    f.tight_layout()
    path = docs / "results" / "sim" / f"{fig.name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    f.savefig(path, dpi=110)
    plt.close(f)


def render_section(docs: Path, calibration: str) -> list[str]:
    """The simulated part of docs/results.md (every figure, its plot redrawn)."""
    quotes = paper_rows()
    out = ["## Simulated at the paper's shapes", "", calibration, ""]
    for fig in FIGURES:
        if any(load_points(docs, fig)):
            plot(fig, docs)
        out += render_figure(fig, docs, quotes)
    return out


def sim_meta(docs: Path) -> tuple[str, str]:
    """(commit, machine) of the simulated points present ("-" when none ran)."""
    for fig in FIGURES:
        for bodies in load_points(docs, fig):
            for body in bodies.values():
                return body.get("commit", "-"), body.get("machine", "-")
    return "-", "-"


def figure_headlines(docs: Path) -> list[tuple[SimFigure, str, str]]:
    """(figure, ours, paper) of every figure's headline, for the summary tables."""
    return [(fig, *headline(fig, docs)) for fig in FIGURES]
