"""The paper's vLLM baseline figures, reproduced in simulated time with nothing fitted to them.

Runs four of the paper's experiments at the paper's setting (`../shared/paper_figures.md`,
common setup, and the artifact's scripts, cited per run below) through the same path as
`python -m scenarios bench` (`scenarios.cli.bench`: the real service, scheduler and engine
core over simulated engines on a next-event clock), in the request-level baseline mode, and
prints "figure | setting | paper (quoted) | ours simulated | error %" with each run's wall time
and host-side work. `--parrot` adds Parrot's mode to every run (rows labelled "Parrot"); Fig. 17
at 16 files always runs both modes (its wall time is the point of that row).

Paper setting: every request pays a network round trip (`--rtt 0.244`: the mean of the paper's
sampled 218-345 ms, fixed here); 1x A100-80GB with Vicuna-13B for Fig. 12b and 17; 4x A6000
with Vicuna-7B, four engines, for Fig. 16 and 18; latency-tuned vLLM has 4096 KV tokens,
throughput-tuned no cap and `--max-num-batched-tokens 8000` (harness SIM_*_TUNED presets).
`--tokenizer DIR` gives the simulated engines that tokenizer (the paper counted tokens with
the Llama tokenizer; default: the embedded SmolLM2's).

Writes OUT/paper_sim.json (every row, every run's argv, wall and host time), OUT/paper_sim.md
(the table) and each run's scenario JSON, PNG and printed table (OUT/KEY.json, .png, .log).
Usage: `python benchmarks/paper_sim.py [--out out/paper_sim] [--parrot] [--only fig12b ...]
[--tokenizer DIR] [--gpts-requests 200]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

RTT = "0.244"
A100 = ["--sim", "a100", "--sim-model", "vicuna-13b"]
A6000X4 = ["--sim", "a6000", "--sim-model", "vicuna-7b", "--engines", "4"]
FIG16_KV_GB = 30000 * 524288 / 1e9
"""The artifact's Fig. 16 vLLM ran with VLLM_CAPACITY=30000 (artifact/figure16/run_vllm.sh):
30,000 KV tokens per engine, 512 KiB each for Vicuna-7B in fp16 (15.73 GB)."""
FIG18_JOB_OFFSETS = "0,0.5,1,11,11.5,12,22,22.5,23"
"""Gaps between the 9 map-reduce jobs (artifact/figure18/benchmark_mr_serving_vllm.py,
`sample_requests`: 0.5, 0.5, 10 s, three times)."""

FIG12B_CHUNKS, FIG12B_CHUNK_TOKENS = 24, 841
"""The chunks the paper's Fig. 12b app sent: its articles (the artifact's arxiv-sampled-1,
article_0..9) split by LangChain's CharacterTextSplitter.from_huggingface_tokenizer(chunk_size=
2048, separator=" ") with the Llama tokenizer, as artifact/figure12b/bench_arxiv_multivm_langchain
.py does, give 243 chunks (22-29 per article) of 841 tokens on average: the splitter sums
len(tokenizer.encode(word)) per word, BOS included, plus the separator's, so a "2048-token" chunk
holds ~840 real tokens. Measured for docs/sim_validation.md; not a fitted value."""
FIG18_CHUNKS, FIG18_CHUNK_TOKENS = 75, 451
"""Likewise for Fig. 18's map-reduce jobs (artifact/figure18/benchmark_mr_serving_vllm.py): paper
0 of arxiv-sampled (our article_0) at chunk_size 1024 gives 75 chunks of 451 tokens on
average."""

Body = dict
Getter = Callable[[Body, str], float]


def _summary(kind: str, field_: str, scale: float = 1.0) -> Getter:
    def get(body: Body, label: str) -> float:
        return float(body["modes"][label]["summary"][kind][field_]) * scale

    return get


def _tpot_ms(name: str) -> Getter:
    """Mean time per output token after the first of the calls named `name` (ms)."""

    def get(body: Body, label: str) -> float:
        calls = body["modes"][label]["result"]["calls"]
        xs = [c["tpot_s"] for c in calls if c["name"] == name and c["completion_tokens"] > 1]
        return 1e3 * sum(xs) / len(xs) if xs else float("nan")

    return get


@dataclass
class Row:
    """One compared number: `metric` (with its unit), the mode label it is read from, the
    paper's value (quoted from ../shared/paper_figures.md) and how to read ours."""

    metric: str
    label: str
    paper: float
    get: Getter
    parrot: bool = False


@dataclass
class Run:
    """One scenario run: `key` (file stem), figure, setting (one line), scenario flags, the
    rows it fills, and whether Parrot's mode always runs (`both`)."""

    key: str
    figure: str
    setting: str
    scenario: str
    flags: list[str]
    rows: list[Row]
    both: bool = False
    extra_argv: list[str] = field(default_factory=list)


def runs(gpts_requests: int) -> list[Run]:
    """The runs, at the paper's setting (sources in each setting line and the module doc)."""
    chain_base = ["--chains", "10", "--output-tokens", "50"]
    chain_base += ["--background", "0", *A100, "--baseline-tuning", "latency"]
    chain = [*chain_base, "--chunk-tokens", "2048"]
    jct = _summary("chain", "mean_s")
    multi = ["--recorded-rounds", "10", *A100, "--baseline-tuning", "throughput"]
    done = _summary("workflow", "mean_s")
    mixed = ["--chats", "40", "--chat-rate", "1", "--chat-arrivals", "uniform"]
    mixed += ["--chat-lengths", "sharegpt", "--jobs", "9", "--job-article", "0"]
    mixed += ["--map-output", "50", "--job-start", "15", "--job-offsets", FIG18_JOB_OFFSETS]
    mixed += [*A6000X4, "--baseline-tuning", "throughput"]
    return [
        Run(
            "fig12b",
            "12b",
            "10 chains, whole articles, chunk 2048, output 50; latency-tuned vLLM "
            "(4096 KV tokens: artifact/figure12b/run_vllm.sh)",
            "chain_summary",
            [*chain, "--chunks", "0"],
            [
                Row("mean JCT (s)", "baseline-latency", 112.8, jct),
                Row("mean JCT (s)", "parrot", 81.7, jct, parrot=True),
            ],
        ),
        Run(
            "fig12b_langchain",
            "12b",
            "as above with the chunks the paper's app really sent: LangChain's splitter at "
            f"chunk_size 2048 gives the paper's articles {FIG12B_CHUNKS} chunks of "
            f"{FIG12B_CHUNK_TOKENS} tokens on average (measured); {FIG12B_CHUNKS} per chain here",
            "chain_summary",
            [
                *chain_base,
                "--chunks",
                str(FIG12B_CHUNKS),
                "--chunk-tokens",
                str(FIG12B_CHUNK_TOKENS),
            ],
            [
                Row("mean JCT (s)", "baseline-latency", 112.8, jct),
                Row("mean JCT (s)", "parrot", 81.7, jct, parrot=True),
            ],
        ),
        Run(
            "fig16",
            "16",
            f"GPTs, 4 apps 1:1:1:1 at full length, Poisson 0.25 req/s, {gpts_requests} requests, "
            "4 engines; throughput-tuned vLLM with 30,000 KV tokens per engine "
            "(artifact/figure16/run_vllm.sh)",
            "gpts",
            [
                "--requests",
                str(gpts_requests),
                "--rate",
                "0.25",
                "--prompt-scale",
                "1",
                "--output-scale",
                "1",
                "--mix",
                "equal",
                *A6000X4,
                "--sim-kv-gb",
                f"{FIG16_KV_GB:.5f}",
                "--baseline-tuning",
                "throughput",
            ],
            [Row("normalized latency (ms/token)", "baseline-throughput", 47.0, _norm("all"))],
        ),
        Run(
            "fig17",
            "17",
            "multi-agent, 4 files, recorded run replayed to 10 rounds; throughput-tuned vLLM",
            "multi_agent",
            ["--files", "4", *multi],
            [
                Row("completion (s)", "baseline-throughput", 237.0, done),
                Row("completion (s)", "parrot", 187.0, done, parrot=True),
            ],
        ),
        Run(
            "fig17_16files",
            "17",
            "multi-agent, 16 files, 10 rounds; throughput-tuned vLLM and Parrot (wall time)",
            "multi_agent",
            ["--files", "16", *multi],
            [
                Row("completion (s)", "baseline-throughput", 529.0, done),
                Row("completion (s)", "parrot", 216.0, done, parrot=True),
            ],
            both=True,
        ),
        Run(
            "fig18",
            "18",
            "40 ShareGPT chats at 1 req/s + 9 map-reduce jobs from 15 s, 4 engines; "
            "throughput-tuned vLLM; maps as the paper's app sent them: LangChain's splitter at "
            f"chunk_size 1024 gives paper 0 {FIG18_CHUNKS} chunks of {FIG18_CHUNK_TOKENS} tokens "
            "(measured)",
            "mixed",
            [*mixed, "--chunks", str(FIG18_CHUNKS), "--chunk-tokens", str(FIG18_CHUNK_TOKENS)],
            [
                Row(
                    "chat normalized latency (ms/token)",
                    "baseline-throughput",
                    184.6,
                    _norm("chat"),
                ),
                Row("chat decode (ms/token)", "baseline-throughput", 77.8, _tpot_ms("chat")),
                Row(
                    "map-reduce JCT (s)",
                    "baseline-throughput",
                    24.5,
                    _summary("map-reduce", "mean_s"),
                ),
                Row(
                    "chat normalized latency (ms/token)",
                    "parrot",
                    149.1,
                    _norm("chat"),
                    parrot=True,
                ),
                Row("chat decode (ms/token)", "parrot", 45.1, _tpot_ms("chat"), parrot=True),
                Row(
                    "map-reduce JCT (s)",
                    "parrot",
                    23.2,
                    _summary("map-reduce", "mean_s"),
                    parrot=True,
                ),
            ],
        ),
        Run(
            "fig18_whole1024",
            "18",
            "as above, maps of 1024 tokens over the whole paper (chunk 1024 read as tokens)",
            "mixed",
            [*mixed, "--chunks", "0", "--chunk-tokens", "1024"],
            [
                Row(
                    "chat normalized latency (ms/token)",
                    "baseline-throughput",
                    184.6,
                    _norm("chat"),
                ),
                Row("chat decode (ms/token)", "baseline-throughput", 77.8, _tpot_ms("chat")),
                Row(
                    "map-reduce JCT (s)",
                    "baseline-throughput",
                    24.5,
                    _summary("map-reduce", "mean_s"),
                ),
                Row(
                    "chat normalized latency (ms/token)",
                    "parrot",
                    149.1,
                    _norm("chat"),
                    parrot=True,
                ),
                Row("chat decode (ms/token)", "parrot", 45.1, _tpot_ms("chat"), parrot=True),
                Row(
                    "map-reduce JCT (s)",
                    "parrot",
                    23.2,
                    _summary("map-reduce", "mean_s"),
                    parrot=True,
                ),
            ],
        ),
    ]


def _norm(kind: str) -> Getter:
    """Mean over apps of latency / output tokens (ms per token): the paper's normalized
    latency (the artifact divides each request's latency by its requested output length)."""
    return _summary(kind, "norm_s_per_token", 1e3)


def run_one(run: Run, out: Path, parrot: bool, tokenizer: str | None, seed: int = 0) -> dict:
    """Run one scenario through `scenarios.cli.bench`; its printed table goes to OUT/KEY.log.
    Returns the run's record (argv, wall time, per-mode host work, rows)."""
    from scenarios.cli import bench, parser

    mode = "both" if (parrot or run.both) else "baseline"
    argv = ["bench", run.scenario, *run.flags, "--rtt", RTT, "--mode", mode]
    argv += ["--no-progress", "--out", str(out)]
    if tokenizer:
        argv += ["--sim-tokenizer", tokenizer]
    if seed:
        argv += ["--seed", str(seed)]
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    with open(out / f"{run.key}.log", "w") as log, contextlib.redirect_stdout(log):
        _, body = bench(args, argv)
    wall = time.perf_counter() - t0
    (out / f"{run.scenario}.json").replace(out / f"{run.key}.json")
    (out / f"{run.scenario}.png").replace(out / f"{run.key}.png")
    modes = {
        label: {
            k: m["result"]["extra"].get(k)
            for k in (
                "wall_s",
                "host_busy_s",
                "sim_steps",
                "sim_preemptions",
                "sim_evictions",
                "sim_mean_batch_size",
                "sim_max_batch_size",
                "sim_busy_s_max",
            )
        }
        | {"makespan_s": m["result"]["wall_s"], "tokens": m["result"]["tokens"]}
        for label, m in body["modes"].items()
    }
    rows = []
    for row in run.rows:
        if row.label not in body["modes"]:
            continue
        ours = row.get(body, row.label)
        rows.append(
            {
                "figure": run.figure,
                "key": run.key,
                "setting": run.setting,
                "metric": row.metric,
                "system": "Parrot" if row.parrot else row.label.replace("baseline", "vLLM"),
                "paper": row.paper,
                "ours": round(ours, 2),
                "error_pct": round(100 * (ours - row.paper) / row.paper, 1),
            }
        )
    return {"key": run.key, "argv": argv, "wall_s": round(wall, 2), "modes": modes, "rows": rows}


def markdown(records: list[dict]) -> str:
    """The table: one line per compared number, then the wall time of every run."""
    lines = [
        "| figure | setting | system | metric | paper (quoted) | ours simulated | error % |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        for r in rec["rows"]:
            lines.append(
                f"| {r['figure']} | {r['setting']} | {r['system']} | {r['metric']} | "
                f"{r['paper']:g} | {r['ours']:.1f} | {r['error_pct']:+.1f} |"
            )
    lines += ["", "| run | wall s (whole run) | mode | wall s | host busy s |"]
    lines += ["|---|---|---|---|---|"]
    for rec in records:
        for label, m in rec["modes"].items():
            lines.append(
                f"| {rec['key']} | {rec['wall_s']:.1f} | {label} | {m['wall_s']} | "
                f"{m['host_busy_s']} |"
            )
    return "\n".join(lines) + "\n"


def _machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": model, "python": platform.python_version(), "commit": commit}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/paper_sim", help="output folder")
    ap.add_argument("--parrot", action="store_true", help="run Parrot's mode too")
    ap.add_argument("--only", nargs="*", help="run only these keys (fig12b, fig16, ...)")
    ap.add_argument("--tokenizer", help="tokenizer folder of the simulated engines")
    ap.add_argument("--seed", type=int, default=0, help="seed of arrivals and data picks")
    ap.add_argument(
        "--gpts-requests", type=int, default=200, help="Fig. 16 requests (the artifact: 50)"
    )
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs(a.gpts_requests) if not a.only or r.key in a.only]
    records = []
    bar = tqdm(todo, desc="paper_sim", unit="run")
    for run in bar:
        bar.set_postfix_str(run.key)
        records.append(run_one(run, out, a.parrot, a.tokenizer, a.seed))
    bar.close()
    table = markdown(records)
    print(table)
    meta = _machine() | {"tokenizer": a.tokenizer or "default (SmolLM2)", "rtt_s": float(RTT)}
    meta["seed"] = a.seed
    (out / "paper_sim.json").write_text(json.dumps({"meta": meta, "runs": records}, indent=1))
    (out / "paper_sim.md").write_text(table)
    print(f"wrote {out / 'paper_sim.json'} and {out / 'paper_sim.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
