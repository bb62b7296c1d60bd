"""Map-reduce summary (Parrot §8.2, Fig. 13): summarize the chunks of an arXiv paper, then one
reduce combines the partial summaries.

Parrot submits the maps and the reduce at once: the maps form a task group (their outputs all
feed the reduce) and run batched for throughput, the reduce starts when the last map resolves,
and the app pays one network round trip. The baseline app sends one map, awaits it, sends the
next (`--baseline-maps sequential`, the request-level app of docs/design.md), or all maps at once
(`concurrent`, LangChain's batched map step), then the reduce; a round trip per request.
"""

from __future__ import annotations

import argparse
import asyncio

import parrot_actors as pa
from scenarios import workloads
from scenarios.context import RunContext, run_apps
from scenarios.functions import make_function, max_tokens_of, render

NAME = "map_reduce_summary"
FIGURE = "Fig. 13"
SMALLEST = ["--chunks", "3", "--chunk-tokens", "24", "--output-tokens", "4", "--reduce-tokens", "4"]
"""Flags of the smallest size (CI)."""
BASELINE_TUNINGS = ["same"]


def add_args(p: argparse.ArgumentParser) -> None:
    """Scenario flags (sizes in tokens)."""
    p.add_argument("--jobs", type=int, default=1, help="map-reduce jobs (one document each)")
    p.add_argument("--chunks", type=int, default=16, help="chunks (maps) per document")
    p.add_argument("--chunk-tokens", type=int, default=64, help="tokens per chunk")
    p.add_argument("--output-tokens", type=int, default=48, help="tokens per map summary")
    p.add_argument("--reduce-tokens", type=int, default=48, help="tokens of the final summary")
    p.add_argument(
        "--baseline-maps",
        choices=["sequential", "concurrent"],
        default="sequential",
        help="how the baseline app sends its maps",
    )
    p.add_argument(
        "--sequential", action="store_true", help="run the jobs one after another (Fig. 13)"
    )


def num_apps(args: argparse.Namespace) -> int:
    """Apps the progress bar counts: the jobs."""
    return args.jobs


def map_function(max_tokens: int) -> object:
    """The map step: one chunk in, its summary out."""
    return make_function(
        "summarize_chunk",
        "Summarize the following part of a paper in two sentences.\n"
        "Text: {{chunk}}\nSummary: {{out}}",
        ["chunk"],
        [],
        max_tokens,
    )


def reduce_function(n: int, max_tokens: int) -> object:
    """The reduce step over `n` partial summaries (one input each)."""
    names = [f"s{i}" for i in range(n)]
    bullets = "\n".join(f"- {{{{{x}}}}}" for x in names)
    return make_function(
        f"reduce{n}",
        f"Combine these partial summaries of a paper into one summary.\n{bullets}\n"
        "Summary: {{out}}",
        names,
        [],
        max_tokens,
    )


def job_chunks(ctx: RunContext, args: argparse.Namespace, job: int) -> list[str]:
    """The chunks of job `job`'s document (arXiv paper `job`)."""
    return workloads.chunks(ctx.tokenizer, workloads.article(job), args.chunks, args.chunk_tokens)


async def parrot_job(
    ctx: RunContext,
    chunks: list[str],
    map_tokens: int,
    reduce_tokens: int,
    tag: str,
    perf: str = pa.LATENCY,
) -> str:
    """Submit one whole map-reduce job, await its final summary with objective `perf`, keep
    every output under `tag/...`, and return the final summary."""
    fn = map_function(map_tokens)
    maps = [fn(chunk=pa.Variable(c)) for c in chunks]
    final = reduce_function(len(maps), reduce_tokens)(*maps)
    text = await final.get(perf=perf)
    await ctx.network()
    for i, m in enumerate(maps):
        ctx.keep(f"{tag}/map{i}", m.value())
    ctx.keep(f"{tag}/reduce", text)
    return text


async def baseline_job(
    ctx: RunContext,
    chunks: list[str],
    map_tokens: int,
    reduce_tokens: int,
    tag: str,
    app: int,
    concurrent: bool,
) -> str:
    """One map-reduce job the request-level way; keeps outputs under `tag/...`."""
    fn = map_function(map_tokens)
    mt = max_tokens_of(fn)
    if concurrent:
        outs = await asyncio.gather(
            *(ctx.complete(render(fn, chunk=c), mt, "summarize_chunk", app) for c in chunks)
        )
    else:
        outs = []
        for c in chunks:
            outs.append(await ctx.complete(render(fn, chunk=c), mt, "summarize_chunk", app))
    red = reduce_function(len(outs), reduce_tokens)
    values = {f"s{i}": o for i, o in enumerate(outs)}
    text = await ctx.complete(render(red, **values), reduce_tokens, red.name, app)
    for i, o in enumerate(outs):
        ctx.keep(f"{tag}/map{i}", o)
    ctx.keep(f"{tag}/reduce", text)
    return text


async def run_parrot(ctx: RunContext, args: argparse.Namespace) -> None:
    """Parrot: each job submitted whole."""

    async def job(j: int) -> None:
        arrival = ctx.now()
        chunks = job_chunks(ctx, args, j)
        text = await parrot_job(ctx, chunks, args.output_tokens, args.reduce_tokens, f"job{j}")
        ctx.finish(j, "map-reduce", arrival, [text], len(chunks) + 1)

    await run_apps(args.jobs, job, args.sequential)


async def run_baseline(ctx: RunContext, args: argparse.Namespace) -> None:
    """Baseline: request by request (maps sequential or concurrent, then the reduce)."""

    async def job(j: int) -> None:
        arrival = ctx.now()
        chunks = job_chunks(ctx, args, j)
        text = await baseline_job(
            ctx,
            chunks,
            args.output_tokens,
            args.reduce_tokens,
            f"job{j}",
            j,
            args.baseline_maps == "concurrent",
        )
        ctx.finish(j, "map-reduce", arrival, [text], len(chunks) + 1)

    await run_apps(args.jobs, job, args.sequential)
