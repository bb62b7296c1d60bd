"""Mixed workloads (Parrot §8.5, Fig. 18): chat requests (real ShareGPT prompts) arriving as a
Poisson process beside map-reduce analytics jobs on the same service.

Parrot knows the chats are awaited with `pa.LATENCY` and the analytics jobs with
`pa.THROUGHPUT`, so chats are admitted first while the map stages batch for throughput. The
baseline cannot tell them apart; it is run twice, on an engine tuned for latency (small
batches) and one tuned for throughput (large batches and prefill chunks). The baseline's jobs
send their maps concurrently (LangChain's batched map step). Metrics: chat normalized latency
(seconds per output token) and map-reduce job completion time.

The paper's run (Fig. 18; the artifact's `start_benchmark_vllm.py`): 40 chats one second apart
(`--chat-arrivals uniform --chat-rate 1`) with real ShareGPT prompts and answer lengths
(`--chat-lengths sharegpt`), and 9 map-reduce jobs over one whole paper (`--job-article 0
--chunks 0 --chunk-tokens 1024 --map-output 50`) from 15 s on (`--job-start 15 --job-offsets
0,0.5,1,11,11.5,12,22,22.5,23`, the artifact's gaps).
"""

from __future__ import annotations

import argparse
import asyncio

import parrot_actors as pa
from scenarios import workloads
from scenarios.context import RunContext
from scenarios.functions import make_function, max_tokens_of, render
from scenarios.map_reduce_summary import baseline_job, parrot_job
from scenarios.shared_prompt import user_queries

NAME = "mixed"
FIGURE = "Fig. 18"
SMALLEST = [
    "--chats",
    "2",
    "--chat-rate",
    "0",
    "--chat-prompt-tokens",
    "16",
    "--chat-output",
    "4",
    "--jobs",
    "1",
    "--chunks",
    "2",
    "--chunk-tokens",
    "16",
    "--map-output",
    "4",
]
"""Flags of the smallest size (CI)."""
BASELINE_TUNINGS = ["latency", "throughput"]


def add_args(p: argparse.ArgumentParser) -> None:
    """Scenario flags (sizes in tokens)."""
    p.add_argument("--chats", type=int, default=12, help="chat requests")
    p.add_argument("--chat-rate", type=float, default=0.3, help="chat requests per second")
    p.add_argument("--chat-prompt-tokens", type=int, default=64, help="chat prompt tokens (max)")
    p.add_argument("--chat-output", type=int, default=24, help="chat answer tokens")
    p.add_argument("--jobs", type=int, default=2, help="map-reduce jobs (all start at once)")
    p.add_argument("--chunks", type=int, default=8, help="maps per job")
    p.add_argument("--chunk-tokens", type=int, default=192, help="tokens per chunk")
    p.add_argument("--map-output", type=int, default=24, help="tokens per map and reduce output")
    p.add_argument(
        "--chat-arrivals",
        choices=["poisson", "uniform"],
        default="poisson",
        help="chat arrivals: a Poisson process, or one every 1/rate s from 0 (the paper's)",
    )
    p.add_argument(
        "--chat-lengths",
        choices=["fixed", "sharegpt"],
        default="fixed",
        help="chat prompt and answer tokens: --chat-prompt-tokens / --chat-output, or each "
        "ShareGPT conversation's own (prompt up to 1024, prompt + answer up to 2048 tokens)",
    )
    p.add_argument(
        "--job-article",
        type=int,
        default=-1,
        help="arXiv paper every job summarizes (-1: job j takes paper j + 1; paper: 0)",
    )
    p.add_argument("--job-start", type=float, default=0.0, help="seconds before the first job")
    p.add_argument(
        "--job-offsets",
        default="",
        help="comma-separated start of each job after --job-start (s; default: all at once)",
    )


def num_apps(args: argparse.Namespace) -> int:
    """Apps the progress bar counts: chats and jobs."""
    return args.chats + args.jobs


def chat_function(max_tokens: int) -> object:
    """A chat turn: the user's message in, the answer out."""
    return make_function(
        "chat", "User: {{message}}\nAssistant: {{out}}", ["message"], [], max_tokens
    )


def job_offsets(args: argparse.Namespace) -> list[float]:
    """Start of each job after `--job-start` (s): `--job-offsets`, 0 for jobs it leaves out.
    Raises `ValueError` for a value that is not a number >= 0."""
    given = [float(x) for x in args.job_offsets.split(",") if x.strip()]
    if any(x < 0 for x in given):
        raise ValueError(f"--job-offsets {args.job_offsets!r}: offsets must be >= 0")
    return (given + [0.0] * args.jobs)[: args.jobs]


async def _chat(ctx: RunContext, fn: object, message: str, i: int, arrival: float) -> None:
    await ctx.until(arrival)
    if ctx.parrot:
        await ctx.network()
        text = await fn(message=pa.Variable(message)).get(perf=pa.LATENCY)
    else:
        text = await ctx.complete(render(fn, message=message), max_tokens_of(fn), "chat", i)
    ctx.keep(f"chat/{i}", text)
    ctx.finish(i, "chat", arrival, [text], 1)


async def _job(ctx: RunContext, args: argparse.Namespace, j: int, start: float) -> None:
    await ctx.until(start)
    arrival = ctx.now()
    text = workloads.article(j + 1 if args.job_article < 0 else args.job_article)
    chunks = workloads.chunks(ctx.tokenizer, text, args.chunks, args.chunk_tokens)
    tag, app = f"job{j}", 1000 + j
    if ctx.parrot:
        out = await parrot_job(ctx, chunks, args.map_output, args.map_output, tag, pa.THROUGHPUT)
    else:
        out = await baseline_job(ctx, chunks, args.map_output, args.map_output, tag, app, True)
    ctx.finish(app, "map-reduce", arrival, [out], len(chunks) + 1)


def chats(ctx: RunContext, args: argparse.Namespace) -> list[tuple[str, int, float]]:
    """Each chat's (message, answer tokens, arrival s)."""
    if args.chat_lengths == "sharegpt":
        pairs = workloads.sharegpt_pairs(ctx.tokenizer, args.chats, seed=ctx.seed)
    else:
        messages = user_queries(ctx, args.chats, args.chat_prompt_tokens)
        pairs = [(m, args.chat_output) for m in messages]
    if args.chat_arrivals == "uniform" and args.chat_rate > 0:
        times = [i / args.chat_rate for i in range(args.chats)]
    else:
        times = workloads.poisson_arrivals(args.chat_rate, args.chats, ctx.seed)
    return [(m, n, t) for (m, n), t in zip(pairs, times)]


async def _run(ctx: RunContext, args: argparse.Namespace) -> None:
    fns: dict[int, object] = {}
    todo = chats(ctx, args)
    for _, n, _ in todo:
        fns.setdefault(n, chat_function(n))
    offsets = job_offsets(args)
    await asyncio.gather(
        *(_job(ctx, args, j, args.job_start + offsets[j]) for j in range(args.jobs)),
        *(_chat(ctx, fns[n], m, i, t) for i, (m, n, t) in enumerate(todo)),
    )


run_parrot = _run
run_baseline = _run
