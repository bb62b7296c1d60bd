"""`python -m scenarios report`: run the measured set and regenerate docs/results.md.

Each entry is one `bench` run with fixed flags (sizes shrunk to finish in minutes on a 2-core
CPU with the real model). Its JSON and PNG go to docs/results/ENTRY/; results.md is rebuilt
from every entry's JSON present, so `--only NAME` re-measures one entry and keeps the others.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from scenarios.report_sim import figure_headlines, render_section, sim_meta
from scenarios.report_text import CALIBRATION, NOTES, PREAMBLE, TOP


@dataclass(frozen=True)
class Entry:
    """One measured configuration. figure: the paper's figure; flags: the bench flags;
    paper: the ratio the paper reports for it (its own hardware and baselines); kind and
    metric: the app kind and `Summary` field whose baseline/Parrot ratio is "ours"; baseline:
    the baseline label of that ratio; target: the ratio this project must reach (None: none);
    also: more (kind, metric, baseline) ratios shown beside it."""

    name: str
    scenario: str
    figure: str
    flags: tuple[str, ...]
    paper: str
    kind: str
    metric: str
    baseline: str
    target: float | None = None
    also: tuple[tuple[str, str, str], ...] = ()


ENTRIES = (
    Entry(
        "chain",
        "chain_summary",
        "Fig. 11",
        ("--chunks", "4", "--chunk-tokens", "128", "--output-tokens", "24"),
        "1.11-1.38x vs vLLM, 1.52-1.88x vs HF (11a)",
        "chain",
        "mean_s",
        "baseline",
    ),
    Entry(
        "chain-background",
        "chain_summary",
        "Fig. 12a",
        ("--chunks", "4", "--chunk-tokens", "128", "--output-tokens", "24", "--background", "24"),
        "1.21-2.38x (0-3.5 req/s background)",
        "chain",
        "mean_s",
        "baseline",
        1.5,
    ),
    Entry(
        "chain-background-light",
        "chain_summary",
        "Fig. 12a",
        ("--chunks", "4", "--chunk-tokens", "128", "--output-tokens", "24", "--background", "12"),
        "-",
        "chain",
        "mean_s",
        "baseline",
    ),
    Entry(
        "chain-multi",
        "chain_summary",
        "Fig. 12b",
        ("--chains", "4", "--chunks", "3", "--chunk-tokens", "96", "--output-tokens", "24"),
        "1.38-1.68x (10-25 chains)",
        "chain",
        "mean_s",
        "baseline",
    ),
    Entry(
        "map-reduce",
        "map_reduce_summary",
        "Fig. 13",
        (
            "--chunks",
            "16",
            "--chunk-tokens",
            "64",
            "--output-tokens",
            "48",
            "--reduce-tokens",
            "48",
        ),
        "1.70-2.37x (13a), 1.96-2.16x (13b)",
        "map-reduce",
        "mean_s",
        "baseline",
        2.0,
    ),
    Entry(
        "shared-prompt",
        "shared_prompt",
        "Fig. 14",
        (
            "--batch",
            "16",
            "--system-tokens",
            "1500",
            "--query-tokens",
            "32",
            "--output-tokens",
            "24",
        ),
        "1.8x (batch 8), 2.4x (16) vs vLLM w/o sharing; 1.1-1.7x vs with",
        "user",
        "mean_s",
        "baseline",
        4.0,
    ),
    Entry(
        "gpts",
        "gpts",
        "Fig. 16",
        ("--requests", "40", "--rate", "1.5"),
        "up to 12x higher sustainable rate; 2.4x vs PagedAttention only",
        "all",
        "norm_s_per_token",
        "baseline",
        also=(("all", "mean_s", "baseline"),),
    ),
    Entry(
        "multi-agent",
        "multi_agent",
        "Fig. 17",
        ("--files", "8", "--design-tokens", "2783"),
        "2.96-11.70x vs latency-tuned (4.90x at 8 files); 1.27-2.45x vs throughput-tuned",
        "workflow",
        "mean_s",
        "baseline-latency",
        5.0,
    ),
    Entry(
        "multi-agent-short",
        "multi_agent",
        "Fig. 17",
        ("--files", "8", "--design-tokens", "1500"),
        "-",
        "workflow",
        "mean_s",
        "baseline-latency",
    ),
    Entry(
        "mixed",
        "mixed",
        "Fig. 18",
        ("--chats", "12", "--chat-rate", "0.3", "--jobs", "2"),
        "chat 5.55x vs latency-tuned, 1.24x vs throughput-tuned; JCT 3.72x / 1.05x",
        "chat",
        "norm_s_per_token",
        "baseline-throughput",
        also=(
            ("chat", "norm_s_per_token", "baseline-latency"),
            ("map-reduce", "mean_s", "baseline-latency"),
            ("map-reduce", "mean_s", "baseline-throughput"),
        ),
    ),
    Entry(
        "agent-trace",
        "agent_trace",
        "agents",
        tuple(
            "--sessions 3 --session-rate 0.5 --turns-median 8 --turns-range 4 12 "
            "--system-tokens 300 --task-tokens 64 --tool-tokens 16 128 --output-tokens 8 32 "
            "--tool-gap 0.5 5 --subagent-share 0.34 --subagents 2 2 --subagent-turns 2 4".split()
        ),
        "- (beyond the paper)",
        "session",
        "mean_s",
        "baseline",
    ),
)
"""The measured set, in the order of the paper's figures, then the agentic trace."""


def run_report(docs: Path, only: list[str] | None = None, part: str = "all") -> int:
    """Run the simulated figures (`part` "all" or "sim": `report_sim.run_figures`) and this
    CPU's entries ("all" or "real"; all, or those named in `only`), each entry in its own
    process (a fresh interpreter per entry keeps one entry's memory from the next), then
    rewrite docs/results.md from every JSON present. Returns 0, 2 for an unknown name, or
    the exit status of the first run that failed."""
    from scenarios.report_sim import FIGURES, run_figures

    names = {e.name for e in ENTRIES} | {f.name for f in FIGURES}
    unknown = sorted(set(only or ()) - names)
    if unknown:
        print(f"unknown entries {unknown}; entries and figures: {sorted(names)}")
        return 2
    if part in ("all", "sim"):
        sims = [n for n in only or () if n in {f.name for f in FIGURES}]
        if not only or sims:
            status = run_figures(docs, sims or None)
            if status:
                return status
    for e in ENTRIES if part in ("all", "real") else ():
        if only and e.name not in only:
            continue
        print(f"== {e.name} ({e.figure})", flush=True)
        argv = ["bench", e.scenario, *e.flags, "--out", str(docs / "results" / e.name)]
        status = subprocess.run([sys.executable, "-m", "scenarios", *argv]).returncode
        if status:
            return status
    (docs / "results.md").write_text(render(docs))
    print(f"wrote {docs / 'results.md'}")
    if update_readme(docs.resolve().parent / "README.md", docs):
        print("updated README.md's headline table")
    return 0


def _ratio(body: dict, kind: str, metric: str, baseline: str) -> float:
    v = body["speedup"].get(kind, {}).get(metric, {}).get(baseline)
    return math.nan if v is None else v


def _cell(x: object, fmt: str = "{:.2f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _mode_table(body: dict) -> list[str]:
    from scenarios.output import _ROWS

    lines = []
    labels = list(body["modes"])
    kinds = list(next(iter(body["modes"].values()))["summary"])
    for kind in kinds:
        lines += [f"Apps: **{kind}**", "", "| | " + " | ".join(labels) + " |"]
        lines.append("|---" * (len(labels) + 1) + "|")
        for title, field, fmt in _ROWS:
            cells = [_cell(body["modes"][x]["summary"][kind][field], fmt) for x in labels]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        for metric, title in (
            ("mean_s", "speedup, mean e2e"),
            ("norm_s_per_token", "speedup, normalized"),
        ):
            sp = body["speedup"][kind][metric]
            cells = ["1.00x" if x == "parrot" else _cell(sp.get(x), "{:.2f}x") for x in labels]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _profile(body: dict) -> list[str]:
    lines = [
        "| mode | wall (s) | round trips | calls | prefill computed | reused | generated |"
        " engine steps | preemptions | load avg | engine |",
        "|---" * 11 + "|",
    ]
    for label, m in body["modes"].items():
        r = m["result"]
        t = r["tokens"]
        eng = r["engine"]
        lines.append(
            f"| {label} | {r['wall_s']:.1f} | {r['round_trips']} | {len(r['calls'])} | "
            f"{t['prefill_tokens']} | {t['reused_tokens']} | {t['generated_tokens']} | "
            f"{t['steps']} | {t['preemptions']} | {r['load'][0]:.1f} -> {r['load'][1]:.1f} | "
            f"max_running={eng['max_running']}, "
            f"max_batch_tokens={eng['max_batch_tokens']}, x{eng['count']} |"
        )
    return lines


def replot(docs: Path) -> None:
    """Redraw every entry's PNG from its JSON (no run)."""
    import msgspec

    from scenarios import load
    from scenarios.output import plot
    from scenarios.records import ModeResult

    for e in ENTRIES:
        path = docs / "results" / e.name / f"{e.scenario}.json"
        if path.exists():
            body = json.loads(path.read_text())
            results = [msgspec.convert(m["result"], ModeResult) for m in body["modes"].values()]
            title = f"{e.scenario} ({load(e.scenario).FIGURE})"
            plot(path.with_suffix(".png"), title, results)


def _cpu_entry(figure: str, name: str = "") -> Entry | None:
    """This CPU's entry for a paper figure id ("11a" -> the "Fig. 11" entry), or the entry
    named like the simulated figure `name` (the workloads beyond the paper)."""
    for e in ENTRIES:
        if e.name == name:
            return e
    for fig in (f"Fig. {figure}", f"Fig. {figure.rstrip('ab')}"):
        for e in ENTRIES:
            if e.figure == fig:
                return e
    return None


def _commits(bodies: dict[str, dict]) -> str:
    """The commits the entries' JSONs name (runs before 951e94e recorded none)."""
    found = sorted({b.get("commit", "-") for b in bodies.values()} or {"-"})
    return ", ".join("unrecorded (older runs)" if c == "-" else c for c in found)


def _overview(docs: Path, bodies: dict[str, dict], link: str = "", machine: str = "") -> list[str]:
    """Every figure in one table: the paper's number (quoted), ours simulated at its shape,
    ours real on this CPU at a small shape, each naming where it ran. `link` prefixes the
    anchors (README links into docs/results.md); `machine` names this CPU in the table's
    preamble (else it points to the machine named below it)."""
    sim_commit, _ = sim_meta(docs)
    cpu_commit = _commits(bodies)
    where = f"this CPU: {machine}" if machine else "machine below"
    out = [
        "## Every figure: the paper, simulated at its shape, real on this CPU",
        "",
        f"Simulated: commit {sim_commit}, simulated GPUs (the paper's hardware per figure). "
        f"This CPU: commit {cpu_commit}, the embedded SmolLM2-135M at small sizes "
        f"({where}). Ratios are baseline time / Parrot time.",
        "",
        "| figure | what | paper (quoted) | ours, simulated | ours, this CPU |",
        "|---|---|---|---|---|",
    ]
    for fig, ours, paper in figure_headlines(docs):
        if fig.headline is None:
            continue
        series = fig.series[fig.headline[0]]
        x = fig.xs[fig.headline[1]]
        what = series.label + (f" at {x:g} {fig.xlabel}" if fig.xlabel != "-" else "")
        e = _cpu_entry(fig.figure, fig.name)
        cpu = "-"
        if e is not None and e.name in bodies:
            ratio = _ratio(bodies[e.name], e.kind, e.metric, e.baseline)
            cpu = (
                f"{_cell(ratio, '{:.2f}x')} vs {e.baseline} ([{e.name}]({link}#{e.name}), this CPU)"
            )
        out.append(
            f"| [{fig.figure}]({link}#fig-{fig.name}) | {fig.title}: {what} | {paper} | "
            f"{ours} (simulated {fig.hardware}) | {cpu} |"
        )
    return out


def _bodies(docs: Path) -> dict[str, dict]:
    bodies: dict[str, dict] = {}
    for e in ENTRIES:
        path = docs / "results" / e.name / f"{e.scenario}.json"
        if path.exists():
            bodies[e.name] = json.loads(path.read_text())
    return bodies


HEADLINE = ("<!-- headline: generated by `python -m scenarios report` -->", "<!-- /headline -->")


def update_readme(readme: Path, docs: Path) -> bool:
    """Replace the README's headline table (between the `HEADLINE` markers) with the report's
    overview, linking into docs/results.md. Returns False (README untouched) without both
    markers."""
    if not readme.exists():
        return False
    text = readme.read_text()
    start, end = HEADLINE
    if start not in text or end not in text:
        return False
    bodies = _bodies(docs)
    machine = next((b["machine"] for b in bodies.values()), "-")
    table = _overview(docs, bodies, "docs/results.md", machine)[2:]
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(head + start + "\n" + "\n".join(table) + "\n" + end + tail)
    return True


def render(docs: Path) -> str:
    """results.md from the JSONs under docs/results/."""
    bodies = _bodies(docs)
    machine = next((b["machine"] for b in bodies.values()), "-")
    commit = _commits(bodies)
    out = [TOP, ""] + _overview(docs, bodies) + [""]
    out += render_section(docs, CALIBRATION) + [""]
    out += [PREAMBLE.format(machine=machine, commit=commit), "", "### Summary (this CPU)", ""]
    out += [
        "| figure | entry | sizes (flags) | paper | ours | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in ENTRIES:
        b = bodies.get(e.name)
        ours = _ratio(b, e.kind, e.metric, e.baseline) if b else math.nan
        what = f"{e.baseline} / parrot, {e.metric} of {e.kind}"
        for kind, metric, base in e.also if b else ():
            what += f"; {_cell(_ratio(b, kind, metric, base), '{:.2f}x')} {base} / parrot, "
            what += f"{metric} of {kind}"
        met = "-" if e.target is None or not b else ("yes" if ours >= e.target else "**no**")
        target = "-" if e.target is None else f">= {e.target:g}x"
        out.append(
            f"| {e.figure} | [{e.name}](#{e.name}) | `{' '.join(e.flags)}` | {e.paper} | "
            f"{_cell(ours, '{:.2f}x')} ({what}) | {target} | {met} |"
        )
    for e in ENTRIES:
        b = bodies.get(e.name)
        out += [
            "",
            f"### {e.name}",
            "",
            f"{e.figure}, scenario `{e.scenario}`. Command: "
            f"`python -m scenarios bench {e.scenario} {' '.join(e.flags)}`",
            "",
        ]
        if not b:
            out += ["Not measured yet.", ""]
            continue
        out += _mode_table(b)
        out += ["Profile (counters of the engines over the run):", ""] + _profile(b) + [""]
        n, bad = b["outputs_compared"], b["outputs_differ"]
        same = "identical" if not bad else f"{len(bad)} differ ({', '.join(bad[:4])})"
        out += [f"Greedy outputs of {n} calls across modes: {same}.", ""]
        out += [f"![{e.name}](results/{e.name}/{e.scenario}.png)", ""]
        if e.name in NOTES:
            out += [NOTES[e.name], ""]
    return "\n".join(out) + "\n"
