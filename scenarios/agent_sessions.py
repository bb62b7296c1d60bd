"""Agent sessions over the OpenAI API: N concurrent ReAct-style sessions, each a loop of turns
(the model's answer, then a tool result of `--tool-tokens` appended after a simulated tool
latency), next to a stream of one-shot long-prompt requests (a document pipeline sharing the
engine), all driven through the `openai` client's chat and completion APIs.

Parrot mode sends the app's hints (`extra_body={"parrot": {...}}`): each session names itself
(its requests are one program, ordered by attained service) and keeps its context between
turns for `--retain-s` seconds, so a turn computes only its new tokens; the one-shot requests
say they are throughput work. The baseline sends the same requests without hints to the
request-level server: first come, first served, with automatic prefix caching, whose least
recently used blocks the one-shot prompts evict while a session waits on its tool.

Not a figure of the Parrot paper (the paper predates agent sessions over the OpenAI API): the
setting of Continuum (arXiv 2511.02230, KV kept through tool calls) and Autellix (arXiv
2502.13965, program-level scheduling). Reported: session completion time (mean, p90), the
one-shot requests' latency, and the prefill tokens computed.
"""

from __future__ import annotations

import argparse
import asyncio
import random

from scenarios import workloads
from scenarios.context import RunContext
from scenarios.records import CallRecord, ModeResult

NAME = "agent_sessions"
FIGURE = "agents"
SMALLEST = [
    "--sessions",
    "2",
    "--turns",
    "2",
    "2",
    "--tool-latency",
    "0.05",
    "0.1",
    "--tool-tokens",
    "20",
    "40",
    "--system-tokens",
    "40",
    "--answer-tokens",
    "4",
    "--oneshot-clients",
    "1",
    "--oneshot-tokens",
    "64",
]
"""Flags of the smallest size (CI)."""
BASELINE_TUNINGS = ["same"]


def add_args(p: argparse.ArgumentParser) -> None:
    """Scenario flags."""
    p.add_argument("--sessions", type=int, default=4, help="concurrent agent sessions")
    p.add_argument(
        "--turns", type=int, nargs=2, default=(6, 10), metavar=("MIN", "MAX"), help="turns"
    )
    p.add_argument(
        "--tool-latency",
        type=float,
        nargs=2,
        default=(0.5, 3.0),
        metavar=("MIN", "MAX"),
        help="seconds a tool call takes (uniform)",
    )
    p.add_argument(
        "--tool-tokens",
        type=int,
        nargs=2,
        default=(100, 300),
        metavar=("MIN", "MAX"),
        help="tokens of a tool result (uniform)",
    )
    p.add_argument("--system-tokens", type=int, default=300, help="system prompt tokens")
    p.add_argument("--answer-tokens", type=int, default=32, help="max tokens of a turn")
    p.add_argument("--retain-s", type=float, default=30.0, help="Parrot: context kept (s)")
    p.add_argument(
        "--oneshot-clients", type=int, default=2, help="clients sending one-shot requests"
    )
    p.add_argument("--oneshot-tokens", type=int, default=1000, help="one-shot prompt: 1-1.5x")
    p.add_argument("--oneshot-answer", type=int, default=8, help="one-shot max tokens")
    p.add_argument(
        "--tool-waits-oneshots",
        type=int,
        default=0,
        help="a tool call also lasts until this many more one-shot requests have finished "
        "(at most 30 s): the pressure on the cache during a tool call then does not depend "
        "on the machine's speed (tests)",
    )


ONESHOT_WAIT_S = 30.0
"""Longest a tool call waits for one-shot requests to finish (seconds)."""


class _Done:
    """How many one-shot requests have finished, for sessions that wait on it."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Condition()

    async def finished_one(self) -> None:
        async with self.changed:
            self.count += 1
            self.changed.notify_all()

    async def wait_for(self, count: int) -> None:
        """Until `count` one-shots have finished, or `ONESHOT_WAIT_S` has passed."""
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.count >= count), ONESHOT_WAIT_S
                )
            except asyncio.TimeoutError:
                pass


def num_apps(args: argparse.Namespace) -> int:
    """Apps the progress bar counts: the sessions."""
    return args.sessions


SYSTEM = (
    "You are a research agent. Think step by step. To use a tool, write `Action: search[...]`"
    " and wait for the Observation; when you know the answer, write `Final Answer: ...`.\n"
)


def _plan(args: argparse.Namespace, seed: int) -> list[tuple[list[float], list[int]]]:
    """Per session: its tool latencies (seconds) and tool result sizes (tokens), one per turn
    after the first; seeded, so both modes run the same sessions."""
    rng = random.Random(seed)
    plans = []
    for _ in range(args.sessions):
        turns = rng.randint(*args.turns)
        waits = [rng.uniform(*args.tool_latency) for _ in range(turns - 1)]
        sizes = [rng.randint(*args.tool_tokens) for _ in range(turns - 1)]
        plans.append((waits, sizes))
    return plans


async def chat_turn(
    ctx: RunContext, messages: list[dict], max_tokens: int, session: str, retain_s: float, app: int
) -> str:
    """One greedy chat request of agent `session` after a network round trip, recorded as
    call "turn" of app `app`; Parrot mode names the session and keeps its context `retain_s`
    seconds. Returns the answer. Raises the `openai` client's errors."""
    hints = {"parrot": {"session": session, "retain_s": retain_s}} if ctx.parrot else None
    await ctx.network()
    start = ctx.now()
    got = await ctx.openai.chat.completions.create(
        model=ctx.model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        extra_body=hints,
    )
    record_call(ctx, "turn", app, start, got.usage)
    return got.choices[0].message.content or ""


def record_call(ctx: RunContext, name: str, app: int, start: float, usage: object) -> None:
    """Append the baseline's record of call `name` of app `app`, sent at `start` (seconds since
    the run began) with OpenAI `usage` (prompt and completion tokens), timed by the client;
    Parrot's records come from the service, so nothing is recorded in Parrot mode."""
    if not ctx.parrot:
        ctx.calls.append(
            CallRecord(
                name=name,
                app=app,
                e2e_s=ctx.now() - start,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
            )
        )


async def _session(
    ctx: RunContext,
    args: argparse.Namespace,
    app: int,
    plan: tuple[list[float], list[int]],
    sources: list[str],
    oneshots: _Done,
) -> None:
    waits, sizes = plan
    system = SYSTEM + workloads.fit(ctx.tokenizer, workloads.system_prompt(), args.system_tokens)
    task = workloads.truncate(ctx.tokenizer, sources[app % len(sources)], 120)
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Question {app}: what does this paper contribute?\n{task}"},
    ]
    offset = 0
    for turn in range(len(waits) + 1):
        answer = await chat_turn(
            ctx, messages, args.answer_tokens, f"agent-{app}", args.retain_s, app
        )
        ctx.keep(f"session{app}/turn{turn}", answer)
        messages.append({"role": "assistant", "content": answer})
        if turn == len(waits):
            break
        target = oneshots.count + args.tool_waits_oneshots
        await asyncio.sleep(waits[turn])  # the tool runs
        if args.tool_waits_oneshots:
            await oneshots.wait_for(target)
        source = sources[(app + turn + 1) % len(sources)]
        result = workloads.chunks(ctx.tokenizer, source, offset + 1, sizes[turn])[offset]
        offset += 1
        messages.append({"role": "user", "content": f"Observation: {result}"})
    ctx.finish(app, "session", 0.0, [messages[-1]["content"]], len(waits) + 1)


async def _oneshots(
    ctx: RunContext, args: argparse.Namespace, client: int, done: asyncio.Event, count: _Done
) -> None:
    """One client's one-shot requests, back to back until the sessions are done: each a
    prompt never seen before (a numbered excerpt), so caching it only evicts others."""
    hints = {"parrot": {"objective": "throughput"}} if ctx.parrot else None
    rng = random.Random(ctx.seed * 1000 + client)
    i = 0
    while not done.is_set():
        source = workloads.article(rng.randrange(10))
        size = args.oneshot_tokens + rng.randrange(args.oneshot_tokens // 2 + 1)
        text = workloads.fit(ctx.tokenizer, source, size)
        cut = rng.randrange(len(text) // 2)
        prompt = f"Request {client}-{i}. Summarize:\n{text[cut:]}{text[:cut]}\nSummary:"
        await ctx.network()
        start = ctx.now()
        got = await ctx.openai.completions.create(
            model=ctx.model,
            prompt=prompt,
            max_tokens=args.oneshot_answer,
            temperature=0,
            extra_body=hints,
        )
        app = 10_000 + client * 1000 + i
        ctx.extra["oneshot_prompt_tokens"] = (
            ctx.extra.get("oneshot_prompt_tokens", 0) + got.usage.prompt_tokens
        )
        record_call(ctx, "oneshot", app, start, got.usage)
        ctx.finish(app, "background", start, [got.choices[0].text], 1, progress=False)
        await count.finished_one()
        i += 1


async def _run(ctx: RunContext, args: argparse.Namespace) -> None:
    sources = [workloads.article(i) for i in range(10)]
    plans = _plan(args, ctx.seed)
    done, count = asyncio.Event(), _Done()
    background = [
        asyncio.ensure_future(_oneshots(ctx, args, c, done, count))
        for c in range(args.oneshot_clients)
    ]
    try:
        await asyncio.gather(
            *(_session(ctx, args, i, plan, sources, count) for i, plan in enumerate(plans))
        )
    finally:
        done.set()
        await asyncio.gather(*background)


run_parrot = _run
run_baseline = _run


def derived(result: ModeResult) -> dict[str, float]:
    """Rows the table adds: the one-shot requests' prompt tokens (never seen before, so
    computed in full in every mode) and the prefill computed for the sessions (all prefill
    minus those)."""
    oneshot = result.extra.get("oneshot_prompt_tokens", 0.0)
    return {
        "session prefill (tok)": result.tokens.prefill_tokens - oneshot,
        "one-shot prompts (tok)": oneshot,
    }
