"""Mixed workloads (Parrot §8.5, Fig. 18): chat requests (real ShareGPT prompts) arriving as a
Poisson process beside map-reduce analytics jobs on the same service.

Parrot knows the chats are awaited with `pa.LATENCY` and the analytics jobs with
`pa.THROUGHPUT`, so chats are admitted first while the map stages batch for throughput. The
baseline cannot tell them apart; it is run twice, on an engine tuned for latency (small
batches) and one tuned for throughput (large batches and prefill chunks). The baseline's jobs
send their maps concurrently (LangChain's batched map step). Metrics: chat normalized latency
(seconds per output token) and map-reduce job completion time.
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


def num_apps(args: argparse.Namespace) -> int:
    """Apps the progress bar counts: chats and jobs."""
    return args.chats + args.jobs


def chat_function(max_tokens: int) -> object:
    """A chat turn: the user's message in, the answer out."""
    return make_function(
        "chat", "User: {{message}}\nAssistant: {{out}}", ["message"], [], max_tokens
    )


async def _chat(ctx: RunContext, fn: object, message: str, i: int, arrival: float) -> None:
    await ctx.until(arrival)
    if ctx.parrot:
        await ctx.network()
        text = await fn(message=pa.Variable(message)).get(perf=pa.LATENCY)
    else:
        text = await ctx.complete(render(fn, message=message), max_tokens_of(fn), "chat", i)
    ctx.keep(f"chat/{i}", text)
    ctx.finish(i, "chat", arrival, [text], 1)


async def _job(ctx: RunContext, args: argparse.Namespace, j: int) -> None:
    arrival = ctx.now()
    text = workloads.article(j + 1)
    chunks = workloads.chunks(ctx.tokenizer, text, args.chunks, args.chunk_tokens)
    tag, app = f"job{j}", 1000 + j
    if ctx.parrot:
        out = await parrot_job(ctx, chunks, args.map_output, args.map_output, tag, pa.THROUGHPUT)
    else:
        out = await baseline_job(ctx, chunks, args.map_output, args.map_output, tag, app, True)
    ctx.finish(app, "map-reduce", arrival, [out], len(chunks) + 1)


async def _run(ctx: RunContext, args: argparse.Namespace) -> None:
    fn = chat_function(args.chat_output)
    messages = user_queries(ctx, args.chats, args.chat_prompt_tokens)
    times = workloads.poisson_arrivals(args.chat_rate, args.chats, ctx.seed)
    await asyncio.gather(
        *(_job(ctx, args, j) for j in range(args.jobs)),
        *(_chat(ctx, fn, m, i, t) for i, (m, t) in enumerate(zip(messages, times))),
    )


run_parrot = _run
run_baseline = _run
