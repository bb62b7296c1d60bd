"""LangChain apps (Parrot §8.2's map-reduce and chain summaries as LCEL chains) run four ways:
what LangChain users do today against what Parrot gives them.

The chains are `examples/langchain_summaries.py`'s (prompt | model | StrOutputParser, the way
LangChain's docs write them), over chunks of a real arXiv paper. Each variant gets its own
fresh service with the same engine settings:

- `chatopenai`: langchain-openai's `ChatOpenAI` runs the chain step by step (LangChain runs
  the parallel maps concurrently) against the request-level baseline service (FCFS, no prefix
  sharing): what users run today.
- `chatparrot`: the same chain step by step over `ChatParrot(url=...)` with a session hint per
  app, on a Parrot service.
- `compiled`: `compile_chain(chain)`: each run is one Parrot submission (one render request
  while the session opens, one batch of every call, one wait).
- `handwritten`: the same prompts as semantic functions through `pa.Runtime.connect`, the
  hand-written Parrot app (the shape of scenarios/map_reduce_summary and chain_summary).

Every client talks to its service through `scenarios.netsim.DelayProxy`: each HTTP request
pays `--rtt` (250 ms) whatever library sends it, and is counted. Greedy decoding: all four
variants must produce the same final summaries.
"""

from __future__ import annotations

import argparse
import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import parrot_actors as pa
from scenarios import workloads
from scenarios.context import RunContext
from scenarios.functions import make_function
from scenarios.netsim import DelayProxy
from scenarios.records import ModeResult

NAME = "langchain_apps"
FIGURE = "Fig. 11/13"
SMALLEST = ["--chunks", "3", "--chunk-tokens", "24", "--output-tokens", "4"]
"""Flags of the smallest size (CI)."""
BASELINE_TUNINGS = ["same"]
VARIANTS = [
    ("chatopenai", "baseline", "same"),
    ("chatopenai-latency", "baseline", "latency"),
    ("chatparrot", "parrot", "same"),
    ("compiled", "parrot", "same"),
    ("handwritten", "parrot", "same"),
]
"""(label, service, engine tuning) of each client variant, in table order. "latency": the
latency-tuned baseline engine of Parrot §8.2's map-reduce comparison (`LATENCY_TUNED`)."""
REFERENCE = "compiled"
"""Speedups are each variant's time over compile_chain's."""
APPS = ("map-reduce", "chain")


def add_args(p: argparse.ArgumentParser) -> None:
    """Scenario flags (sizes in tokens)."""
    p.add_argument("--apps", nargs="+", choices=APPS, default=list(APPS), help="apps to run")
    p.add_argument("--runs", type=int, default=1, help="runs of each app (one after another)")
    p.add_argument("--chunks", type=int, default=6, help="chunks per document")
    p.add_argument("--chunk-tokens", type=int, default=64, help="tokens per chunk")
    p.add_argument("--output-tokens", type=int, default=32, help="max tokens of every summary")


def num_apps(args: argparse.Namespace) -> int:
    """Apps the progress bar counts: every run of every app."""
    return len(args.apps) * args.runs


@cache
def example() -> ModuleType:
    """examples/langchain_summaries.py, whose chain builders every variant runs."""
    path = Path(__file__).resolve().parent.parent / "examples" / "langchain_summaries.py"
    spec = importlib.util.spec_from_file_location("langchain_summaries", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chain_of(app: str, llm: Any, n: int) -> Any:
    """The LCEL chain of `app` over chat model `llm` and `n` chunks."""
    ex = example()
    return ex.map_reduce(llm, n) if app == "map-reduce" else ex.chain_summary(llm, n)


async def run(ctx: RunContext, args: argparse.Namespace) -> None:
    """Every run of every app, one after another, in `ctx.variant`'s way."""
    # Imports and the clients' one-off setup stay out of the timed runs.
    import langchain_openai  # noqa: F401

    from parrot_actors.integrations import chains

    async with DelayProxy(ctx.url, ctx.rtt_s) as proxy:
        for r in range(args.runs):
            for a, app in enumerate(args.apps):
                chunks = workloads.chunks(
                    ctx.tokenizer, workloads.article(r), args.chunks, args.chunk_tokens
                )
                inputs = {f"c{i}": c for i, c in enumerate(chunks)}
                arrival = ctx.now()
                start = proxy.count
                out = await _VARIANTS[ctx.variant](ctx, args, proxy.url, app, inputs, r)
                n = r * len(args.apps) + a
                ctx.keep(f"run{r}/{app}", out)
                calls = len(chunks) + 1 if app == "map-reduce" else len(chunks)
                ctx.finish(n, app, arrival, [out], calls)
                path = proxy.since(start)["network s"]  # the app's path ends with its answer
                await chains.sessions_ended()  # compiled runs end their session after it
                cost = {**proxy.since(start), "network s": path}
                for key, value in cost.items():
                    ctx.extra[f"{app} {key}"] = ctx.extra.get(f"{app} {key}", 0.0) + value
        ctx.round_trips = proxy.count


async def _chat_openai(
    ctx: RunContext, args: argparse.Namespace, url: str, app: str, inputs: dict, run: int
) -> str:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=url + "/v1",
        api_key="unused",
        model=ctx.model,
        temperature=0,
        max_tokens=args.output_tokens,
        max_retries=0,
        timeout=3600,
    )
    return str(await chain_of(app, llm, len(inputs)).ainvoke(inputs))


def _chat_parrot(url: str, args: argparse.Namespace, app: str, run: int) -> Any:
    from parrot_actors.integrations.langchain import ChatParrot

    return ChatParrot(
        url=url,
        temperature=0,
        max_tokens=args.output_tokens,
        session=f"{app}-{run}",
        timeout_s=3600,
    )


async def _step_by_step(
    ctx: RunContext, args: argparse.Namespace, url: str, app: str, inputs: dict, run: int
) -> str:
    llm = _chat_parrot(url, args, app, run)
    return str(await chain_of(app, llm, len(inputs)).ainvoke(inputs))


async def _compiled(
    ctx: RunContext, args: argparse.Namespace, url: str, app: str, inputs: dict, run: int
) -> str:
    from parrot_actors.integrations.chains import compile_chain

    chain = chain_of(app, _chat_parrot(url, args, app, run), len(inputs))
    return str(await compile_chain(chain, strict=True).ainvoke(inputs))


def chat_function(ctx: RunContext, name: str, user: str, inputs: list[str], max_tokens: int):
    """A semantic function whose prompt is the served model's chat template over the
    example's system message and `user` (with `{{x}}` placeholders for `inputs`): the exact
    text the chat endpoint renders for the LangChain steps."""
    system = example().SYSTEM
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt = ctx.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return make_function(name, prompt + "{{out}}", inputs, [], max_tokens)


async def _handwritten(
    ctx: RunContext, args: argparse.Namespace, url: str, app: str, inputs: dict, run: int
) -> str:
    ex = example()
    mt = args.output_tokens
    n = len(inputs)
    summarize = chat_function(
        ctx, "summarize", ex.MAP_USER.format(chunk="{{chunk}}"), ["chunk"], mt
    )
    async with pa.Runtime.connect(url, get_timeout_s=3600.0):
        if app == "map-reduce":
            maps = [summarize(chunk=pa.Variable(inputs[f"c{i}"])) for i in range(n)]
            names = [f"s{i}" for i in range(n)]
            user = ex.reduce_user(n).format(**{x: f"{{{{{x}}}}}" for x in names})
            final = chat_function(ctx, f"combine{n}", user, names, mt)(*maps)
        else:
            user = ex.REFINE_USER.format(summary="{{summary}}", chunk="{{chunk}}")
            refine = chat_function(ctx, "refine", user, ["summary", "chunk"], mt)
            final = summarize(chunk=pa.Variable(inputs["c0"]))
            for i in range(1, n):
                final = refine(summary=final, chunk=pa.Variable(inputs[f"c{i}"]))
        return await final.get(perf=pa.LATENCY)


_VARIANTS = {
    "chatopenai": _chat_openai,
    "chatopenai-latency": _chat_openai,
    "chatparrot": _step_by_step,
    "compiled": _compiled,
    "handwritten": _handwritten,
}


def derived(result: ModeResult) -> dict[str, float]:
    """Per app: HTTP requests and the time spent on the simulated network (seconds in which at
    least one request was in flight there: concurrent requests overlap)."""
    return dict(sorted(result.extra.items()))
