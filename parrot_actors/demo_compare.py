"""What `parrot-actors demo` prints after the apps' outputs: each app under Parrot beside the
same app run the request-level way on the same engine, and a short summary per engine.

The request-level run is the baseline of every comparison (docs/design.md, "Baseline for every
comparison"), in-process: a second `Runtime` over the demo runtime's own engine objects, with
`BASELINE` as its scheduler (first come, first served, no prefix forking), and the app written
the way a client of a request-level server writes it (`apps.snake_game_request_level`,
`apps.map_reduce_request_level`): each call is sent as a plain request once the one before it
returned. The numbers of a run are differences of the engines' counters before and after it
(`run_numbers`); the formatting (`comparison_line`, `engine_summary`) is pure and synchronous.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from parrot_actors.scheduler.config import SchedulerConfig

if TYPE_CHECKING:
    from parrot_actors.engines.api import EngineClient
    from parrot_actors.messages import EngineStats
    from parrot_actors.runtime import Runtime, RuntimeStats

BASELINE = SchedulerConfig(policy="fcfs", prefix_sharing=False, automatic_prefix_caching=False)
"""The request-level baseline's scheduler, as in scenarios/: FCFS, every call latency work,
no prefix forking. (`automatic_prefix_caching` only reaches engines a runtime builds from
configs; over ready engine objects the demo turns it off where it builds them.)"""

SNAKE = "WriteSnakeGame"
MAP_REDUCE = "Map-reduce summary"


@dataclass(frozen=True)
class RunNumbers:
    """One app run: end-to-end wall time (seconds), calls completed, and tokens summed over
    the engines: prefill computed, prefill reused (forked or found cached), generated."""

    seconds: float
    calls: int
    prefill_tokens: int
    reused_tokens: int
    generated_tokens: int


def run_numbers(before: RuntimeStats, after: RuntimeStats, seconds: float) -> RunNumbers:
    """The run between two `Runtime.stats()` snapshots of one runtime (counters are totals
    since start, so a run's share is their difference), lasting `seconds`."""
    return RunNumbers(
        seconds=seconds,
        calls=after.calls_completed - before.calls_completed,
        prefill_tokens=after.prefill_tokens - before.prefill_tokens,
        reused_tokens=after.reused_tokens - before.reused_tokens,
        generated_tokens=after.generated_tokens - before.generated_tokens,
    )


def speedup(parrot: RunNumbers, baseline: RunNumbers) -> float | None:
    """Baseline time over Parrot time (> 1: Parrot is faster; a ratio, no unit); None when
    Parrot's time is not positive."""
    if parrot.seconds <= 0:
        return None
    return baseline.seconds / parrot.seconds


def comparison_line(app: str, parrot: RunNumbers, baseline: RunNumbers, width: int = 0) -> str:
    """One line: `app` (padded to `width` characters) under Parrot and request-level, each
    with its end-to-end time (s) and prefill tokens computed / reused, then the speedup."""
    ratio = speedup(parrot, baseline)
    shown = "n/a" if ratio is None else f"{ratio:.2f}x"
    return (
        f"{app + ':':<{width + 1}} Parrot {parrot.seconds:.2f}s "
        f"(prefill {parrot.prefill_tokens} computed / {parrot.reused_tokens} reused) | "
        f"request-level {baseline.seconds:.2f}s "
        f"(prefill {baseline.prefill_tokens} computed / {baseline.reused_tokens} reused) | "
        f"speedup {shown}"
    )


def comparison_lines(rows: Sequence[tuple[str, RunNumbers, RunNumbers]]) -> list[str]:
    """A header line, then `comparison_line` per (app, Parrot, baseline) row, app names
    aligned."""
    width = max((len(app) for app, _, _ in rows), default=0)
    header = (
        "Parrot vs request-level on the same engine (FCFS, no prefix sharing, "
        "each call sent when the one before it returned):"
    )
    return [header] + ["  " + comparison_line(a, p, b, width) for a, p, b in rows]


def engine_summary(stats: EngineStats, calls: int) -> str:
    """One line for an engine: `calls` (finished calls it ran), prefill tokens computed and
    reused, tokens generated, steps and mean sequences per step, the most KV blocks in use at
    once out of all (blocks of `block_size` tokens), then anything abnormal (preemptions,
    evictions, restarts, unhealthy)."""
    line = (
        f"{stats.name}: {calls} call{'' if calls == 1 else 's'}, prefill "
        f"{stats.prefill_tokens} computed / {stats.reused_tokens} reused tokens, "
        f"{stats.generated_tokens} generated, {stats.steps} steps "
        f"(mean batch {stats.mean_batch_size:.2f}), "
        f"KV {stats.kv_blocks_peak}/{stats.kv_blocks_total} blocks peak"
    )
    extras = [
        f"{n} {what}"
        for n, what in (
            (stats.preemptions, "preemptions"),
            (stats.evictions, "evictions"),
            (stats.restarts, "restarts"),
        )
        if n
    ]
    if not stats.healthy:
        extras.append(f"unhealthy ({stats.last_error or 'no error recorded'})")
    return line + "".join(f", {x}" for x in extras)


async def measure(rt: Runtime, run: Callable[[], Awaitable[object]]) -> RunNumbers:
    """Await `run()` inside `rt` and return its numbers (wall time in seconds, and the
    differences of `rt.stats()` around it)."""
    before = rt.stats()
    t0 = time.perf_counter()
    await run()
    seconds = time.perf_counter() - t0
    return run_numbers(before, rt.stats(), seconds)


async def request_level(
    engines: Sequence[EngineClient], chunks: list[str]
) -> dict[str, RunNumbers]:
    """Both demo apps the request-level way on `engines` (ready engine objects, left running):
    WriteSnakeGame, then the map-reduce summary of `chunks`. Returns app name -> numbers.

    Honest reuse: the engines must not reuse KV by hash (the demo builds them with automatic
    prefix caching off) and this runtime's scheduler forks nothing, so whatever a previous
    run left on the engines (Parrot's retained prefix contexts, cached blocks) is never read
    here: every prompt token is computed."""
    import parrot_actors as pa
    from parrot_actors import apps

    async with pa.Runtime(engines=list(engines), scheduler=BASELINE) as base:
        snake = await measure(base, apps.snake_game_request_level)
        summary = await measure(base, lambda: apps.map_reduce_request_level(chunks))
    return {SNAKE: snake, MAP_REDUCE: summary}
