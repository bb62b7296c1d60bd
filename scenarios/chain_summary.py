"""Chain summary (Parrot §8.2, Fig. 11 and 12): summarize a long arXiv paper chunk by chunk,
each step reading the running summary.

Parrot submits the whole chain at once (the service starts step k+1 the moment step k's output
resolves, at latency priority because the app awaits the last summary with `pa.LATENCY`) and
pays one network round trip per chain. The baseline sends step k+1 only after step k's answer
came back, paying a round trip per step. Fig. 12a: `--background W` adds W closed-loop streams
of other clients' requests (throughput work: Parrot API with `pa.THROUGHPUT` in Parrot mode,
plain OpenAI completions in the baseline). Fig. 12b: `--chains N` runs N chains at once.
Chain c summarizes arXiv paper c; `--chunks 0` takes the whole paper in `--chunk-tokens`
pieces, as the paper's LangChain refine chain does (Fig. 12b: chunk 2048, output 50).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random

import parrot_actors as pa
from scenarios import workloads
from scenarios.context import RunContext, run_apps
from scenarios.functions import make_function, max_tokens_of, render

NAME = "chain_summary"
FIGURE = "Fig. 11/12"
INITIAL = "(nothing yet)"
SMALLEST = [
    "--chains",
    "1",
    "--chunks",
    "2",
    "--chunk-tokens",
    "24",
    "--output-tokens",
    "4",
    "--background",
    "1",
    "--background-output",
    "4",
    "--background-warmup",
    "0",
]
"""Flags of the smallest size (CI)."""
BASELINE_TUNINGS = ["same"]


def add_args(p: argparse.ArgumentParser) -> None:
    """Scenario flags (sizes in tokens)."""
    p.add_argument("--chains", type=int, default=1, help="concurrent chains (Fig. 12b)")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="run the chains one after another (Fig. 11: one chain at a time, article c each)",
    )
    p.add_argument(
        "--chunks",
        type=int,
        default=4,
        help="chunks (steps) per chain; 0: the whole article (the paper's Fig. 11/12 chains)",
    )
    p.add_argument("--chunk-tokens", type=int, default=128, help="tokens per chunk")
    p.add_argument("--output-tokens", type=int, default=24, help="summary tokens per step")
    p.add_argument("--background", type=int, default=0, help="background request streams")
    p.add_argument(
        "--background-rate",
        type=float,
        default=0.0,
        help="background requests per second, Poisson (Fig. 12a: 0-3.5); instead of --background",
    )
    p.add_argument("--background-prompt", type=int, default=64, help="background prompt tokens")
    p.add_argument("--background-output", type=int, default=32, help="background output tokens")
    p.add_argument(
        "--background-warmup", type=float, default=3.0, help="seconds of load before the chains"
    )


def num_apps(args: argparse.Namespace) -> int:
    """Apps the progress bar counts: the chains."""
    return args.chains


def step_function(args: argparse.Namespace) -> object:
    """One chain step: the running summary and the next chunk in, a refined summary out."""
    return make_function(
        "chain_step",
        "Here is a summary of a document so far: {{summary}}\n"
        "Refine the summary with the next part of the document.\n"
        "Next part: {{chunk}}\nRefined summary: {{out}}",
        ["summary", "chunk"],
        [],
        args.output_tokens,
    )


def background_function(args: argparse.Namespace) -> object:
    """A background request: continue a piece of text."""
    return make_function(
        "background",
        "Continue this text with a detailed paragraph.\nText: {{text}}\nParagraph: {{out}}",
        ["text"],
        [],
        args.background_output,
    )


def _parts(ctx: RunContext, args: argparse.Namespace, chain: int) -> list[str]:
    return workloads.chunks(ctx.tokenizer, workloads.article(chain), args.chunks, args.chunk_tokens)


async def background_load(ctx: RunContext, args: argparse.Namespace) -> asyncio.Task | None:
    """Start the background load and return its task, after `args.background_warmup` seconds
    so the engine is loaded when the measured apps start: `args.background` closed-loop
    streams (each sends its next request when the last one returned, one round trip each),
    or open-loop Poisson arrivals at `args.background_rate` requests per second (Fig. 12a:
    512-token prompts, 50-token outputs), each request sent at its time whatever the others
    do. Raises `ValueError` when both are asked for."""
    if args.background > 0 and args.background_rate > 0:
        raise ValueError(
            f"--background {args.background} and --background-rate {args.background_rate:g}: "
            "pick one (closed-loop streams or Poisson arrivals)"
        )
    if args.background <= 0 and args.background_rate <= 0:
        return None
    fn = background_function(args)
    texts = workloads.chunks(ctx.tokenizer, workloads.article(7), 64, args.background_prompt)

    async def send(key: int, text: str) -> None:
        arrival = ctx.now()
        if ctx.parrot:
            await ctx.network()
            out = await fn(text=pa.Variable(text)).get(perf=pa.THROUGHPUT)
        else:
            out = await ctx.complete(render(fn, text=text), max_tokens_of(fn), "background", key)
        ctx.finish(key, "background", arrival, [out], 1, progress=False)

    async def stream(w: int) -> None:
        i = 0
        while True:
            await send(10_000 + w * 1000 + i, texts[(w * 7 + i) % len(texts)])
            i += 1

    async def poisson() -> None:
        rng = random.Random(ctx.seed)
        sent: set[asyncio.Task] = set()
        try:
            for i in itertools.count():
                await asyncio.sleep(rng.expovariate(args.background_rate))
                task = asyncio.ensure_future(send(10_000 + i, texts[i % len(texts)]))
                sent.add(task)
                task.add_done_callback(sent.discard)
        finally:
            for task in sent:
                task.cancel()

    if args.background_rate > 0:
        task = asyncio.ensure_future(poisson())
    else:
        task = asyncio.ensure_future(asyncio.gather(*(stream(w) for w in range(args.background))))
    await asyncio.sleep(args.background_warmup)
    return task


async def stop_background(task: asyncio.Task | None) -> None:
    """Cancel the background streams (their unfinished requests are dropped)."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def run_parrot(ctx: RunContext, args: argparse.Namespace) -> None:
    """Parrot: every chain submitted whole; one round trip per chain."""
    fn = step_function(args)
    bg = await background_load(ctx, args)

    async def chain(c: int) -> None:
        arrival = ctx.now()
        summary = pa.Variable(INITIAL)
        steps = []
        for part in _parts(ctx, args, c):
            summary = fn(summary=summary, chunk=pa.Variable(part))
            steps.append(summary)
        final = await summary.get(perf=pa.LATENCY)
        await ctx.network()
        for i, s in enumerate(steps):
            ctx.keep(f"chain{c}/step{i}", s.value())
        ctx.finish(c, "chain", arrival, [final], len(steps))

    await run_apps(args.chains, chain, args.sequential)
    await stop_background(bg)


async def run_baseline(ctx: RunContext, args: argparse.Namespace) -> None:
    """Baseline: each step is sent after the previous answer came back."""
    fn = step_function(args)
    bg = await background_load(ctx, args)

    async def chain(c: int) -> None:
        arrival = ctx.now()
        summary = INITIAL
        parts = _parts(ctx, args, c)
        for i, part in enumerate(parts):
            prompt = render(fn, summary=summary, chunk=part)
            summary = await ctx.complete(prompt, max_tokens_of(fn), "chain_step", c)
            ctx.keep(f"chain{c}/step{i}", summary)
        ctx.finish(c, "chain", arrival, [summary], len(parts))

    await run_apps(args.chains, chain, args.sequential)
    await stop_background(bg)
