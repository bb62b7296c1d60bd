"""Agentic trace replay: root agent sessions of many turns, tool gaps and parallel sub-agents
(the shape of recorded agent traffic), generated from a seed or read from a JSONL trace, driven
through the `openai` client's chat API in both modes.

The shape (defaults of `TraceParams`), after the recorded agentic sessions that AIPerf's AgentX
replay serves (ai-dynamo/aiperf) and SWE-agent style trajectories: sessions arrive as a Poisson
process; a root session runs a lognormal number of turns (median 40); each turn appends a tool
result (log-uniform 20-1,000 tokens) after a tool call of log-uniform 0.5-30 s, so more than
90% of each turn's prompt is the previous turn's prompt and answer; a share of the roots
(30%) hands one turn's work to 2-4 parallel sub-agents (3-10 turns each, over the same system
prompt) and reads their reports in its next turn; a session ends early rather than outgrow
its context (`max_context_tokens`). The distributions are assumptions with the published
medians and ranges, not fits to one recorded trace: `--trace FILE` replays any trace in this
module's JSONL format (`--trace-out FILE` writes the generated one), e.g. converted from a
user's own logs.

Parrot mode names each (sub-)agent's session in its requests (`extra_body={"parrot":
{"session": ..., "retain_s": ...}}`), so its turns are one program ordered by attained
service and its context is kept through the tool call; the baseline sends the same requests
without hints to a request-level server with automatic prefix caching. Apps: "session" (a
root, its sub-agents' time included) and "sub-agent"; an app's e2e is its wall time minus its
own tool time: how long it waited on the service and the network.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
from pathlib import Path

import msgspec

from scenarios import workloads
from scenarios.agent_sessions import chat_turn
from scenarios.context import RunContext
from scenarios.records import ModeResult

NAME = "agent_trace"
FIGURE = "agents"
BASELINE_TUNINGS = ["same"]


class TraceTurn(msgspec.Struct, frozen=True, array_like=True):
    """One request of a session. gap_s: the tool call before it (seconds; 0 for the first
    turn and for the turn that reads sub-agents' reports, whose time is theirs). new_tokens:
    tokens the app appends before it (the task, a tool result; 0 when it reads sub-agents'
    reports, whose length is their answers'). output_tokens: its `max_tokens`."""

    gap_s: float
    new_tokens: int
    output_tokens: int


class TraceSession(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's session. start_s: arrival (seconds from the start; a sub-agent's is 0: it
    starts when its parent's turn `spawn_after` has answered). spawn_after: the turn after
    which `children` run in parallel before the next turn (-1: none)."""

    id: str
    start_s: float = 0.0
    turns: tuple[TraceTurn, ...]
    spawn_after: int = -1
    children: tuple[TraceSession, ...] = ()


class TraceParams(msgspec.Struct, frozen=True, kw_only=True):
    """The generator's knobs. Counts are sessions and turns, sizes tokens, times seconds;
    (lo, hi) ranges are log-uniform (heavy toward lo, as recorded tool latencies and sizes
    are). session_rate: root arrivals per second (Poisson; <= 0: all at 0)."""

    sessions: int = 16
    session_rate: float = 0.2
    turns_median: float = 40.0
    turns_sigma: float = 0.5
    turns_range: tuple[int, int] = (4, 100)
    system_tokens: int = 2000
    task_tokens: int = 200
    tool_tokens: tuple[int, int] = (20, 1000)
    output_tokens: tuple[int, int] = (10, 300)
    tool_gap_s: tuple[float, float] = (0.5, 30.0)
    subagent_share: float = 0.3
    subagents: tuple[int, int] = (2, 4)
    subagent_turns: tuple[int, int] = (3, 10)
    max_context_tokens: int = 30000


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return lo if hi <= lo else math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _turns(p: TraceParams, rng: random.Random, count: int, first_tokens: int) -> list[TraceTurn]:
    """`count` turns at most, stopped before the prompt (system + appended + answers)
    would pass `max_context_tokens`."""
    turns: list[TraceTurn] = []
    context = p.system_tokens
    for k in range(count):
        new = first_tokens if k == 0 else round(_log_uniform(rng, *p.tool_tokens))
        gap = 0.0 if k == 0 else _log_uniform(rng, *p.tool_gap_s)
        out = round(_log_uniform(rng, *p.output_tokens))
        if k > 0 and context + new + out > p.max_context_tokens:
            break
        turns.append(TraceTurn(round(gap, 3), new, out))
        context += new + out
    return turns


def generate(p: TraceParams, seed: int) -> list[TraceSession]:
    """The root sessions of a trace of shape `p` (deterministic in `seed`), by arrival.
    Raises `ValueError` for a range with lo > hi or non-positive sizes."""
    for name in ("turns_range", "tool_tokens", "output_tokens", "tool_gap_s", "subagents"):
        lo, hi = getattr(p, name)
        if lo <= 0 or lo > hi:
            raise ValueError(f"TraceParams.{name}={getattr(p, name)}: need 0 < lo <= hi")
    rng = random.Random(seed)
    times = workloads.poisson_arrivals(p.session_rate, p.sessions, seed)
    roots = []
    for i, t in enumerate(times):
        n = round(rng.lognormvariate(math.log(p.turns_median), p.turns_sigma))
        n = min(max(n, p.turns_range[0]), p.turns_range[1])
        turns = _turns(p, rng, n, p.task_tokens)
        spawn, children = -1, ()
        if len(turns) >= 3 and rng.random() < p.subagent_share:
            spawn = rng.randrange(len(turns) - 2)
            children = tuple(
                TraceSession(
                    id=f"agent-{i}/sub-{j}",
                    turns=tuple(_turns(p, rng, rng.randint(*p.subagent_turns), p.task_tokens)),
                )
                for j in range(rng.randint(*p.subagents))
            )
            # The turn that reads the reports appends their answers, after no tool call.
            turns[spawn + 1] = TraceTurn(0.0, 0, turns[spawn + 1].output_tokens)
        roots.append(
            TraceSession(
                id=f"agent-{i}",
                start_s=round(t, 3),
                turns=tuple(turns),
                spawn_after=spawn,
                children=children,
            )
        )
    return roots


def prefix_shares(s: TraceSession, system_tokens: int) -> list[float]:
    """Per turn after the first: the share of its prompt that is the previous turn's prompt
    and answer (answers at their `output_tokens`; sub-agents' reports at theirs)."""
    shares = []
    prompt = system_tokens + s.turns[0].new_tokens
    for k in range(1, len(s.turns)):
        prev = prompt + s.turns[k - 1].output_tokens
        new = s.turns[k].new_tokens
        if k - 1 == s.spawn_after:
            new = sum(c.turns[-1].output_tokens for c in s.children)
        prompt = prev + new
        shares.append(prev / prompt)
    return shares


def describe(roots: list[TraceSession], system_tokens: int) -> dict[str, float]:
    """A trace's shape: roots and sub-agents (count), median root turns, median and minimum
    prefix share over every turn after the first, the share of those turns whose prefix
    share is over 90%, share of roots with sub-agents, tool gaps'
    median / min / max (s), and the longest prompt (tokens)."""
    sessions = [*roots, *(c for r in roots for c in r.children)]
    shares = [x for s in sessions for x in prefix_shares(s, system_tokens)]
    gaps = [t.gap_s for s in sessions for t in s.turns if t.gap_s > 0]
    longest = max(
        system_tokens + sum(t.new_tokens + t.output_tokens for t in s.turns) for s in sessions
    )
    return {
        "roots": len(roots),
        "sub_agents": len(sessions) - len(roots),
        "turns_median": statistics.median(len(r.turns) for r in roots),
        "prefix_share_median": statistics.median(shares) if shares else 0.0,
        "prefix_share_min": min(shares) if shares else 0.0,
        "prefix_share_over_90": sum(x > 0.9 for x in shares) / len(shares) if shares else 0.0,
        "with_sub_agents": sum(bool(r.children) for r in roots) / len(roots),
        "gap_median_s": statistics.median(gaps) if gaps else 0.0,
        "gap_min_s": min(gaps) if gaps else 0.0,
        "gap_max_s": max(gaps) if gaps else 0.0,
        "longest_prompt_tokens": longest,
    }


def read_trace(path: Path) -> list[TraceSession]:
    """Root sessions from a JSONL trace, one `TraceSession` per line (turns as
    [gap_s, new_tokens, output_tokens]). Raises `ValueError` naming the line that does not
    decode."""
    roots = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                roots.append(msgspec.json.decode(line, type=TraceSession))
            except msgspec.ValidationError as e:
                raise ValueError(f"{path}:{n}: not a trace session: {e}") from e
    if not roots:
        raise ValueError(f"{path}: no sessions")
    return roots


def write_trace(path: Path, roots: list[TraceSession]) -> None:
    """Write `roots` as a JSONL trace (`read_trace` reads it back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in roots))


SMALLEST = [
    "--sessions", "2", "--session-rate", "0", "--turns-median", "3", "--turns-range", "3", "3",
    "--system-tokens", "24", "--task-tokens", "8", "--tool-tokens", "4", "8",
    "--output-tokens", "2", "4", "--tool-gap", "0.01", "0.05", "--subagent-share", "1",
    "--subagents", "2", "2", "--subagent-turns", "2", "2",
]  # fmt: skip
"""Flags of the smallest size (CI): two roots of 3 turns, each with 2 sub-agents."""


def add_args(p: argparse.ArgumentParser) -> None:
    """Scenario flags (defaults: `TraceParams`, the shape of recorded agent traffic)."""
    d = TraceParams()
    p.add_argument("--sessions", type=int, default=d.sessions, help="root sessions")
    p.add_argument("--session-rate", type=float, default=d.session_rate, help="roots per s")
    p.add_argument("--turns-median", type=float, default=d.turns_median, help="root turns")
    p.add_argument("--turns-sigma", type=float, default=d.turns_sigma, help="lognormal sigma")
    for flag, default, kind, help_ in (
        ("--turns-range", d.turns_range, int, "root turns (clip)"),
        ("--tool-tokens", d.tool_tokens, int, "tool result tokens (log-uniform)"),
        ("--output-tokens", d.output_tokens, int, "max tokens per turn (log-uniform)"),
        ("--tool-gap", d.tool_gap_s, float, "tool call seconds (log-uniform)"),
        ("--subagents", d.subagents, int, "sub-agents per spawn (uniform)"),
        ("--subagent-turns", d.subagent_turns, int, "turns per sub-agent (uniform)"),
    ):
        p.add_argument(flag, type=kind, nargs=2, default=default, metavar=("LO", "HI"), help=help_)
    p.add_argument("--system-tokens", type=int, default=d.system_tokens, help="system prompt")
    p.add_argument("--task-tokens", type=int, default=d.task_tokens, help="first user message")
    p.add_argument(
        "--subagent-share", type=float, default=d.subagent_share, help="roots with sub-agents"
    )
    p.add_argument("--max-context", type=int, default=d.max_context_tokens, help="tokens")
    p.add_argument("--retain-s", type=float, default=30.0, help="Parrot: context kept (s)")
    p.add_argument("--trace", type=Path, help="replay this JSONL trace instead of generating")
    p.add_argument("--trace-out", type=Path, help="write the trace replayed (JSONL)")


def params(args: argparse.Namespace) -> TraceParams:
    """`TraceParams` from the scenario flags."""
    return TraceParams(
        sessions=args.sessions,
        session_rate=args.session_rate,
        turns_median=args.turns_median,
        turns_sigma=args.turns_sigma,
        turns_range=tuple(args.turns_range),
        system_tokens=args.system_tokens,
        task_tokens=args.task_tokens,
        tool_tokens=tuple(args.tool_tokens),
        output_tokens=tuple(args.output_tokens),
        tool_gap_s=tuple(args.tool_gap),
        subagent_share=args.subagent_share,
        subagents=tuple(args.subagents),
        subagent_turns=tuple(args.subagent_turns),
        max_context_tokens=args.max_context,
    )


def _trace(args: argparse.Namespace, seed: int) -> list[TraceSession]:
    roots = read_trace(args.trace) if args.trace else generate(params(args), seed)
    if args.trace_out:
        write_trace(args.trace_out, roots)
    return roots


def num_apps(args: argparse.Namespace) -> int:
    """Apps the progress bar counts: every session, roots and sub-agents."""
    roots = read_trace(args.trace) if args.trace else generate(params(args), args.seed)
    return len(roots) + sum(len(r.children) for r in roots)


class _Texts:
    """Source text for prompts of an exact token count: the articles, tokenized once, cut at
    an offset per (session, turn) so that no two sessions share text beyond the system
    prompt by accident."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.ids = [
            tokenizer.encode(workloads.article(i), add_special_tokens=False) for i in range(10)
        ]

    def text(self, key: int, tokens: int) -> str:
        """About `tokens` tokens of article `key % 10` from an offset drawn from `key` (decoded
        ids: re-encoding may differ by a token or two at the edges)."""
        ids = self.ids[key % len(self.ids)]
        start = (key * 7919) % max(1, len(ids) - tokens)
        while len(ids) < start + tokens:
            ids = ids + ids
        return self.tokenizer.decode(ids[start : start + tokens])


SUB_APP = 100_000
"""App ids of sub-agents start here (root i's j-th: SUB_APP + 100 i + j), apart from roots'."""

SYSTEM = (
    "You are a coding agent with tools. Plan, call one tool per turn as `Action: tool[args]`, "
    "read its Observation, and hand independent subtasks to sub-agents when it helps.\n"
)


async def _session(
    ctx: RunContext, args: argparse.Namespace, s: TraceSession, app: int, system: str,
    texts: _Texts, root: bool = True,
) -> str:  # fmt: skip
    """Replay session `s` (and its sub-agents) turn by turn; returns its last answer."""
    messages = [{"role": "system", "content": system}]
    tool_s, start, answer = 0.0, ctx.now(), ""
    for k, turn in enumerate(s.turns):
        if k == 0:
            content = f"Task {s.id}: {texts.text(app, turn.new_tokens)}"
        elif k - 1 == s.spawn_after and s.children:
            reports = await asyncio.gather(
                *(
                    _session(ctx, args, c, SUB_APP + app * 100 + j, system, texts, False)
                    for j, c in enumerate(s.children)
                )
            )
            content = "Sub-agent reports:\n" + "\n".join(reports)
        else:
            await asyncio.sleep(turn.gap_s)  # the tool runs
            tool_s += turn.gap_s
            content = f"Observation: {texts.text(app * 1000 + k, turn.new_tokens)}"
        messages.append({"role": "user", "content": content})
        answer = await chat_turn(ctx, messages, turn.output_tokens, s.id, args.retain_s, app)
        ctx.keep(f"{s.id}/turn{k}", answer)
        messages.append({"role": "assistant", "content": answer})
    kind = "session" if root else "sub-agent"
    ctx.finish(app, kind, start + tool_s, [answer], len(s.turns))
    return answer


async def _run(ctx: RunContext, args: argparse.Namespace) -> None:
    roots = _trace(args, ctx.seed)
    system = SYSTEM + workloads.fit(ctx.tokenizer, workloads.system_prompt(), args.system_tokens)
    texts = _Texts(ctx.tokenizer)
    shape = describe(roots, ctx.count(system))
    ctx.extra.update({f"trace_{k}": float(v) for k, v in shape.items()})

    async def root(i: int, s: TraceSession) -> None:
        await ctx.until(s.start_s)
        await _session(ctx, args, s, i, system, texts)

    await asyncio.gather(*(root(i, s) for i, s in enumerate(roots)))


run_parrot = _run
run_baseline = _run


def derived(result: ModeResult) -> dict[str, float]:
    """Rows the table adds: the trace's shape (the same in both modes)."""
    x = result.extra
    return {
        "trace: turns median": x.get("trace_turns_median", 0.0),
        "trace: prefix share median": x.get("trace_prefix_share_median", 0.0),
        "trace: sub-agents": x.get("trace_sub_agents", 0.0),
    }
