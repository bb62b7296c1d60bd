"""Shared system prompt (Parrot §8.3, Fig. 14/15): many users' queries behind one long
production system prompt (the Bing Chat preamble).

Parrot sees the system prompt as the constant text before the query variable: it fills it once
and forks it for every user (cascade decode reads it once per batch). The baseline sends each
user's whole prompt to the OpenAI-compatible endpoint (`--baseline-apc` lets its engine reuse
cached prefix blocks, vLLM-style; off by default: the baseline without sharing). Users arrive
together (`--rate 0`: a batch of `--batch` queries, Fig. 14) or as a Poisson process. Fig. 14's
shape: 64 users behind 5,107 shared tokens with answers of 183-800 tokens (`--output-range 183
800`), the engine's batch (`--max-running`) 8-64.
"""

from __future__ import annotations

import argparse
import asyncio
import random

import parrot_actors as pa
from scenarios import workloads
from scenarios.context import RunContext
from scenarios.functions import make_function, max_tokens_of, render

NAME = "shared_prompt"
FIGURE = "Fig. 14/15"
SMALLEST = ["--batch", "3", "--system-tokens", "48", "--query-tokens", "8", "--output-tokens", "4"]
"""Flags of the smallest size (CI)."""
BASELINE_TUNINGS = ["same"]


def add_args(p: argparse.ArgumentParser) -> None:
    """Scenario flags (sizes in tokens)."""
    p.add_argument("--batch", type=int, default=16, help="users (queries)")
    p.add_argument("--system-tokens", type=int, default=600, help="system prompt tokens")
    p.add_argument("--query-tokens", type=int, default=32, help="tokens per user query (max)")
    p.add_argument("--output-tokens", type=int, default=24, help="answer tokens")
    p.add_argument(
        "--output-range",
        type=int,
        nargs=2,
        metavar=("LO", "HI"),
        help="answer tokens drawn per user, uniform in [LO, HI] (seeded; Fig. 14: 183 800)",
    )
    p.add_argument("--rate", type=float, default=0.0, help="arrivals per second (0: a batch)")


def num_apps(args: argparse.Namespace) -> int:
    """Apps the progress bar counts: the users."""
    return args.batch


def assistant_function(name: str, max_tokens: int) -> object:
    """A chat app: its system prompt (a plain parameter, so constant text to the service)
    and the user's query in, the answer out."""
    return make_function(
        name, "{{system}}\n\nUser: {{query}}\nAssistant: {{out}}", ["query"], ["system"], max_tokens
    )


def user_queries(ctx: RunContext, count: int, tokens: int) -> list[str]:
    """`count` real user queries (ShareGPT first turns), each cut to `tokens` tokens."""
    return [
        workloads.truncate(ctx.tokenizer, q, tokens)
        for q in workloads.sharegpt_prompts(count, seed=ctx.seed)
    ]


async def one_request(
    ctx: RunContext, fn: object, system: str, query: str, app: int, arrival: float, kind: str
) -> None:
    """One user's query in the current mode (Parrot call or OpenAI completion), arriving at
    `arrival` seconds; records the app and keeps its answer under `kind/app`."""
    await ctx.until(arrival)
    if ctx.parrot:
        await ctx.network()
        text = await fn(system=system, query=pa.Variable(query)).get(perf=pa.LATENCY)
    else:
        prompt = render(fn, system=system, query=query)
        text = await ctx.complete(prompt, max_tokens_of(fn), fn.name, app)
    ctx.keep(f"{kind}/{app}", text)
    ctx.finish(app, kind, arrival, [text], 1)


def output_lengths(args: argparse.Namespace, seed: int) -> list[int]:
    """Each user's answer tokens: `--output-tokens`, or uniform draws in `--output-range`
    (seeded, the same in both modes). Raises `ValueError` for an empty or negative range."""
    if not args.output_range:
        return [args.output_tokens] * args.batch
    lo, hi = args.output_range
    if not 1 <= lo <= hi:
        raise ValueError(f"--output-range {lo} {hi}: needs 1 <= LO <= HI")
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(args.batch)]


async def _run(ctx: RunContext, args: argparse.Namespace) -> None:
    system = workloads.fit(ctx.tokenizer, workloads.system_prompt(), args.system_tokens)
    queries = user_queries(ctx, args.batch, args.query_tokens)
    times = workloads.poisson_arrivals(args.rate, args.batch, ctx.seed)
    fns = [assistant_function("assistant", n) for n in output_lengths(args, ctx.seed)]
    await asyncio.gather(
        *(
            one_request(ctx, fn, system, q, i, t, "user")
            for i, (fn, q, t) in enumerate(zip(fns, queries, times))
        )
    )


run_parrot = _run
run_baseline = _run
