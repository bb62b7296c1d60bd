"""Command line: `python -m scenarios bench SCENARIO [--mode parrot|baseline|both] [--url URL]
[flags]`, `python -m scenarios list`, `python -m scenarios report` (also `parrot-actors bench`).

`bench` replays the scenario in each mode in this process (a fresh in-process service per mode
on 127.0.0.1, or the service at --url), shows progress, prints a table, and writes
OUT/SCENARIO.json (every app's and call's timings, every output) and OUT/SCENARIO.png.
Parrot's per-call timings come from the in-process service's scheduler; with --url only the
baseline's calls (timed by the client) and every app's latency are recorded.
Defaults finish in minutes on a 2-core CPU with the embedded SmolLM2-135M-Instruct; the size
flags reach the paper's sizes on a GPU (`--device cuda`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scenarios import SCENARIO_NAMES, load

ENGINE_DEFAULTS = {
    "chain_summary": {"max_running": 8},
    "agent_sessions": {"baseline_apc": True, "kv_cache_mb": 640.0},
    "agent_trace": {"baseline_apc": True, "kv_cache_mb": 640.0},
}
"""Per-scenario engine defaults. Chain summary: both modes' engine runs 8 sequences at most on
this CPU (not in simulated runs), so background load queues (Fig. 12a's setting: the chain
competes for batch slots). Agent
sessions: the baseline has automatic prefix caching (what vLLM and SGLang users run), and the
KV cache holds about 14k tokens of the embedded model (46 KiB each in float32): the sessions'
contexts fit, the one-shot prompts churn the rest. The agentic trace replay: the same
(automatic prefix caching is what a request-level server of agent traffic runs)."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["parrot", "baseline", "both"], default="both")
    p.add_argument("--url", help="use the service at URL instead of in-process ones")
    p.add_argument("--model", default="default", help="model folder ('default': SmolLM2)")
    p.add_argument("--tiny", action="store_true", help="tiny random-weight model (tests)")
    p.add_argument("--device", default="cpu", help="engine device: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", help="engine dtype (bfloat16 on a GPU)")
    p.add_argument("--engines", type=int, default=1, help="engines per service")
    p.add_argument("--max-running", type=int, help="engine: sequences per step (64; simulated 256)")
    p.add_argument(
        "--max-batch-tokens", type=int, help="engine: tokens per step (2048; simulated 8192)"
    )
    p.add_argument("--kv-cache-mb", type=float, default=2048.0, help="engine: KV cache MiB")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="limit of one mode's run (s; default 1800, simulated runs 86400 simulated s)",
    )
    p.add_argument("--throughput-cap", type=int, default=64, help="Parrot: throughput calls/engine")
    p.add_argument(
        "--latency-cap",
        type=int,
        default=None,
        help="Parrot: at most this many running latency calls per engine (default: none, the "
        "engine's batch; its step time bounds latency work)",
    )
    p.add_argument(
        "--latency-step-slack",
        type=float,
        default=None,
        help="engines: a step carrying latency work may take this share longer than that "
        "work alone, for throughput work (default: EngineConfig's, 0.25)",
    )
    p.add_argument(
        "--latency-tpot",
        type=float,
        default=None,
        help="Parrot: an engine takes another latency call only while its predicted decode "
        "step stays within this many seconds (default: no bound)",
    )
    p.add_argument(
        "--baseline-tuning",
        action="append",
        choices=["same", "latency", "throughput"],
        help="baseline engine: Parrot's settings, latency- or throughput-tuned (repeatable)",
    )
    p.add_argument("--baseline-apc", action="store_true", help="baseline prefix caching on")
    p.add_argument(
        "--baseline-url",
        metavar="URL",
        help="baseline: drive this OpenAI-compatible server (vLLM, SGLang, ours...) the "
        "request-level way instead of an in-process one; its token counters come from its "
        "/metrics when it exposes vLLM's, SGLang's or ours (else n/a)",
    )
    p.add_argument(
        "--baseline-model", metavar="NAME", help="model name at --baseline-url (default: its first)"
    )
    p.add_argument("--rtt", type=float, default=0.25, help="network round trip (s)")
    p.add_argument(
        "--rtt-dist",
        choices=("fixed", "paper"),
        default="fixed",
        help="fixed: --rtt per round trip; paper: each drawn from the paper's 218-345 ms, mean "
        "244 ms, half before the request and half after (scenarios.context.paper_rtt)",
    )
    p.add_argument(
        "--parrot-no-sharing",
        action="store_true",
        help="Parrot's mode without forking shared prefixes (Fig. 17: without sharing)",
    )
    p.add_argument(
        "--no-cascade",
        action="store_true",
        help="engines decode forks without the shared-prefix kernel (Fig. 16: PagedAttention only)",
    )
    p.add_argument(
        "--baseline-cascade",
        action="store_true",
        help="simulated baseline engines decode shared cached blocks with the shared-prefix "
        "kernel too (today's vLLM may; the paper's did not, so by default they do not)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals and data picks")
    p.add_argument("--out", default="out/bench", help="folder for SCENARIO.json / .png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--strict", action="store_true", help="exit 1 if modes' outputs differ")
    sim = p.add_argument_group("simulated engines (simulated time; engines/sim.py)")
    sim.add_argument(
        "--sim",
        metavar="GPU",
        help="simulated engines on GPU (a100-80gb / a100, a6000, h100, cpu-fitted), run in "
        "simulated time",
    )
    sim.add_argument("--sim-model", default="llama-2-7b", help="simulated model (or config.json)")
    sim.add_argument("--sim-dtype", default="float16", help="simulated weights and KV dtype")
    sim.add_argument("--sim-kv-gb", type=float, help="simulated KV cache per engine (GB)")
    sim.add_argument("--sim-tp", type=int, default=1, help="simulated GPUs per engine")
    sim.add_argument("--sim-fit", help="step-time fit JSON (needed by --sim cpu-fitted)")
    sim.add_argument(
        "--sim-latency-kv-tokens",
        type=int,
        default=None,
        help="KV cache of the latency-tuned baseline (tokens; default 4096, the paper's "
        "Fig. 17 used 7096)",
    )
    sim.add_argument(
        "--sim-tokenizer",
        default=None,
        help="tokenizer folder of the simulated engines (a local Hugging Face folder with a "
        "config.json; default: the embedded SmolLM2's): token counts of prompts follow it",
    )
    sim.add_argument(
        "--sim-host",
        choices=["report", "charge"],
        help="our own host-side work: reported beside simulated time (default for GPUs; "
        "deterministic) or charged to it (default for cpu-fitted, which stands for this CPU)",
    )


def parser(prog: str = "python -m scenarios") -> argparse.ArgumentParser:
    """The argument parser of `python -m scenarios` (`prog` names the command in help)."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description="The Parrot paper's workloads, against Parrot and the request-level baseline.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="replay one scenario in both modes")
    scen = bench.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name in SCENARIO_NAMES:
        mod = load(name)
        sp = scen.add_parser(
            name,
            help=f"{mod.__doc__.split(' (')[0]} ({mod.FIGURE})",
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(sp)
        mod.add_args(sp)
        defaults = dict(ENGINE_DEFAULTS.get(name, {}))
        # Engine sizes for this CPU; a simulated GPU run takes the GPU defaults instead.
        sp.set_defaults(cpu_max_running=defaults.pop("max_running", None), **defaults)
    sub.add_parser("list", help="list the scenarios and their figures")
    rep = sub.add_parser("report", help="run the measured set and write docs/results.md")
    rep.add_argument(
        "--only", nargs="*", help="run only these entries or simulated figures (names)"
    )
    rep.add_argument(
        "--part",
        choices=("all", "sim", "real"),
        default="all",
        help="sim: only the simulated figures (minutes, any machine); real: only this CPU's "
        "entries (about 25 minutes alone on 2 cores); results.md is rebuilt from both",
    )
    rep.add_argument("--docs", default="docs", help="docs folder")
    rep.add_argument(
        "--render-only",
        action="store_true",
        help="redraw the PNGs and rewrite results.md from the saved JSONs (no run)",
    )
    return ap


def bench(args: argparse.Namespace, argv: list[str]) -> tuple[list, dict]:
    """Run `args.scenario` in the modes asked for; print the table; write JSON and PNG.
    Returns (mode results, JSON body)."""
    from scenarios import output
    from scenarios.harness import mode_specs, run_mode

    mod = load(args.scenario)
    tunings = args.baseline_tuning or mod.BASELINE_TUNINGS
    specs = mode_specs(args, tunings, getattr(mod, "VARIANTS", None))
    results = [run_mode(s, mod, args, not args.no_progress) for s in specs]
    output.print_table(args.scenario, results, sys.stdout)
    body = output.report_dict(args.scenario, argv, results)
    out = Path(args.out)
    output.write_json(out / f"{args.scenario}.json", body)
    output.plot(out / f"{args.scenario}.png", f"{args.scenario} ({mod.FIGURE})", results)
    print(f"wrote {out / (args.scenario + '.json')} and {out / (args.scenario + '.png')}")
    return results, body


def main(argv: list[str] | None = None, prog: str = "python -m scenarios") -> int:
    """Entry point; returns the exit status (0 ok; 1 with --strict when the modes' greedy
    outputs differ; 2 for bad arguments, as argparse exits). `prog` names the command in help
    texts (`parrot-actors` when called from there)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser(prog).parse_args(argv)
    if args.command == "list":
        for name in SCENARIO_NAMES:
            mod = load(name)
            print(f"{name:<20} {mod.FIGURE:<11} {mod.__doc__.splitlines()[0]}")
        return 0
    if args.command == "report":
        from scenarios.report import render, replot, run_report, update_readme

        if args.render_only:
            replot(Path(args.docs))
            (Path(args.docs) / "results.md").write_text(render(Path(args.docs)))
            update_readme(Path(args.docs).resolve().parent / "README.md", Path(args.docs))
            return 0
        return run_report(Path(args.docs), args.only, args.part)
    _, body = bench(args, argv)
    if args.strict and body["outputs_differ"]:
        return 1
    return 0
