"""Serving GPTs apps (Parrot §8.3, Fig. 16): four app classes, each with its own system
prompt, query and output lengths and share of the traffic (workloads/gpts/top4.json), requests
arriving as a seeded Poisson process, served by one or more engines (`--engines`).

Lengths are the paper's times `--prompt-scale` / `--output-scale` (1.0 = the paper's sizes);
system prompts are real text (arXiv papers, one per class). Parrot shares each class's system
prompt across its requests (and keeps it on the engine that holds it); the baseline sends whole
prompts. The paper's metric: mean normalized latency (seconds per output token) at a rate.
The paper's run (Fig. 16): `--prompt-scale 1 --output-scale 1 --mix equal --engines 4`.
"""

from __future__ import annotations

import argparse
import asyncio
import random

from scenarios import workloads
from scenarios.context import RunContext
from scenarios.shared_prompt import assistant_function, one_request, user_queries

NAME = "gpts"
FIGURE = "Fig. 16"
SMALLEST = ["--requests", "4", "--rate", "0", "--prompt-scale", "0.01", "--output-scale", "0.01"]
"""Flags of the smallest size (CI)."""
BASELINE_TUNINGS = ["same"]


def add_args(p: argparse.ArgumentParser) -> None:
    """Scenario flags."""
    p.add_argument("--requests", type=int, default=24, help="requests in all")
    p.add_argument("--rate", type=float, default=0.4, help="requests per second (Poisson)")
    p.add_argument("--prompt-scale", type=float, default=0.1, help="system prompt length factor")
    p.add_argument("--output-scale", type=float, default=0.05, help="output length factor")
    p.add_argument("--min-output", type=int, default=4, help="output tokens at least")
    p.add_argument(
        "--mix",
        choices=["share", "equal"],
        default="share",
        help="classes drawn by their share of traffic, or in equal numbers, shuffled (the "
        "paper's Fig. 16: 1:1:1:1)",
    )


def num_apps(args: argparse.Namespace) -> int:
    """Apps the progress bar counts: the requests."""
    return args.requests


def _picks(rng: random.Random, classes: list[workloads.GptsApp], n: int, mix: str) -> list[int]:
    """The class of each of `n` requests: drawn by share, or `n / len(classes)` of each
    (the first `n % len(classes)` classes one more) in a shuffled order."""
    if mix == "share":
        return rng.choices(range(len(classes)), weights=[c.share for c in classes], k=n)
    k = len(classes)
    picks = [i for i in range(k) for _ in range(n // k + (1 if i < n % k else 0))]
    rng.shuffle(picks)
    return picks


async def _run(ctx: RunContext, args: argparse.Namespace) -> None:
    classes = workloads.gpts_apps()
    rng = random.Random(ctx.seed)
    picks = _picks(rng, classes, args.requests, args.mix)
    fns, systems = [], []
    for i, c in enumerate(classes):
        out = max(args.min_output, round(c.output_tokens * args.output_scale))
        fns.append(assistant_function(f"gpts_{i}", out))
        n = max(16, round(c.prompt_tokens * args.prompt_scale))
        systems.append(workloads.fit(ctx.tokenizer, workloads.article(i + 3), n))
    queries = user_queries(ctx, args.requests, max(c.query_tokens for c in classes))
    times = workloads.poisson_arrivals(args.rate, args.requests, ctx.seed)
    await asyncio.gather(
        *(
            one_request(
                ctx,
                fns[k],
                systems[k],
                workloads.truncate(ctx.tokenizer, q, classes[k].query_tokens),
                i,
                t,
                classes[k].name,
            )
            for i, (k, q, t) in enumerate(zip(picks, queries, times))
        )
    )


run_parrot = _run
run_baseline = _run
