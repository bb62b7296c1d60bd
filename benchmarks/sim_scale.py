"""The scheduler's own cost at scale: agent sessions on many simulated GPUs, in simulated time.

Runs the agent-sessions scenario (`scenarios/agent_sessions.py`: ReAct-style sessions over the
OpenAI API with Parrot's session hints, tool waits between turns, contexts retained between
turns) in Parrot mode on N simulated engines (`--sim`), scaling engines and sessions together
up to 64 engines and 2,000 concurrent sessions. Simulated time makes GPU work free in wall
time, so what the wall clock measures is our own host-side work; this benchmark times the two
planning paths on it with `time.perf_counter` around each call:

- the scheduler's planning (`Scheduler._dispatch_now`: one pass over the head of the ready
  queue: tokenizing a call's prompt once, its prefix keys, placement), per call placed and
  per pass, and within it `Scheduler._start` (one call's fork choice and start) per call;
- each engine core's step planning and bookkeeping (`EngineCore.schedule` +
  `EngineCore.finish_step`), reported per step.

Flat per-call and per-step costs as the size grows mean the planning path does not grow with
the queue or the number of engines (as `benchmarks/scheduler_overhead.py` shows for 10,000
calls on echo engines). Also printed: simulated seconds, wall seconds, host-busy seconds (the
event loop running our code), calls and steps.

Usage: `python benchmarks/sim_scale.py [--sizes 8:250 16:500 32:1000 64:2000] [--json F]`
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parrot_actors.engines.core import EngineCore
from parrot_actors.scheduler.actor import Scheduler
from scenarios.cli import bench, parser


@dataclass
class Timer:
    """Calls and real seconds spent in one wrapped function."""

    calls: int = 0
    seconds: float = 0.0

    def per_call_us(self) -> float:
        return 1e6 * self.seconds / max(1, self.calls)


def timed(timer: Timer, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timer.seconds += time.perf_counter() - t0
            timer.calls += 1

    return wrapper


def instrument() -> tuple[Timer, Timer, Timer, Callable[[], None]]:
    """Wrap the planning paths; returns their timers and an undo function."""
    plan, step, start = Timer(), Timer(), Timer()
    saved = (
        Scheduler._dispatch_now,
        EngineCore.schedule,
        EngineCore.finish_step,
        Scheduler._start,
    )
    Scheduler._dispatch_now = timed(plan, saved[0])  # type: ignore[method-assign]
    EngineCore.schedule = timed(step, saved[1])  # type: ignore[method-assign]
    EngineCore.finish_step = timed(step, saved[2])  # type: ignore[method-assign]
    Scheduler._start = timed(start, saved[3])  # type: ignore[method-assign]

    def undo() -> None:
        (
            Scheduler._dispatch_now,
            EngineCore.schedule,
            EngineCore.finish_step,
            Scheduler._start,
        ) = saved  # type: ignore[method-assign]

    return plan, step, start, undo


def run_size(engines: int, sessions: int, args: argparse.Namespace) -> dict[str, Any]:
    """One Parrot-mode run of `sessions` sessions on `engines` simulated engines."""
    argv = [
        "bench", "agent_sessions", "--mode", "parrot", "--sim", args.sim,
        "--sim-model", args.sim_model, "--engines", str(engines),
        "--sessions", str(sessions), "--turns", *map(str, args.turns),
        "--tool-latency", "0.5", "3.0", "--tool-tokens", "100", "300",
        "--system-tokens", "300", "--answer-tokens", str(args.answer_tokens),
        "--oneshot-clients", str(max(1, engines // 4)), "--oneshot-tokens", "2000",
        "--rtt", "0", "--out", str(Path(args.out) / f"e{engines}-s{sessions}"),
    ]  # fmt: skip
    plan, step, start, undo = instrument()
    wall = time.perf_counter()
    try:
        (result,), _ = bench(parser().parse_args(argv), argv)
    finally:
        undo()
    wall = time.perf_counter() - wall
    calls = len(result.calls)
    sim_s = max((a.arrival_s + a.e2e_s for a in result.apps), default=0.0)
    return {
        "engines": engines,
        "sessions": sessions,
        "calls": calls,
        "steps": result.tokens.steps,
        "simulated_s": round(sim_s, 2),
        "wall_s": round(wall, 1),
        "host_busy_s": result.extra.get("host_busy_s"),
        "plan_passes": plan.calls,
        "plan_us_per_pass": round(plan.per_call_us(), 1),
        # `_start` (placing one call: prefix choice, fork, task) runs inside the passes.
        "plan_us_per_call": round(1e6 * plan.seconds / max(1, calls), 1),
        "start_us_per_call": round(start.per_call_us(), 1),
        "engine_us_per_step": round(step.per_call_us() * 2, 1),  # schedule + finish_step
        "session_e2e_mean_s": round(
            sum(a.e2e_s for a in result.apps if a.kind == "session")
            / max(1, sum(a.kind == "session" for a in result.apps)),
            2,
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["8:250", "16:500", "32:1000", "64:2000"])
    ap.add_argument("--sim", default="a100")
    ap.add_argument("--sim-model", default="llama-3-8b")
    ap.add_argument("--turns", type=int, nargs=2, default=(3, 6))
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--out", default="out/sim_scale")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        engines, sessions = (int(x) for x in size.split(":"))
        rows.append(run_size(engines, sessions, args))
        print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True)
    print(
        f"\nsim_scale on {platform.processor() or platform.machine()} at "
        f"{commit.stdout.decode().strip()}: {args.sim} + {args.sim_model}, Parrot mode"
    )
    cols = [
        "engines", "sessions", "calls", "steps", "simulated_s", "wall_s", "host_busy_s",
        "plan_us_per_call", "plan_us_per_pass", "start_us_per_call", "engine_us_per_step",
        "session_e2e_mean_s",
    ]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
