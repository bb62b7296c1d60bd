"""Scheduling cost per call, with no model in the way: 4 `EchoEngine`s (zero delay), so every
millisecond measured is the runtime's and the scheduler's own work.

    python benchmarks/scheduler_overhead.py [--sizes 100 1000 10000] [--chain 300]

Cases: N independent one-output calls submitted at once and awaited together (the ready queue
holds up to N calls), and a chain of calls, each reading the previous one's output (one ready
call at a time, every step a graph event). Prints milliseconds per call, end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import parrot_actors as pa
from parrot_actors.engines.echo import EchoEngine


@pa.semantic_function(max_tokens=8)
def step(x: pa.Input, y: pa.Output):
    """Step {{x}} -> {{y}}"""


def engines() -> list[EchoEngine]:
    return [EchoEngine(name=f"echo{i}") for i in range(4)]


async def independent(n: int) -> float:
    """Milliseconds per call for `n` independent calls submitted at once."""
    async with pa.Runtime(engines=engines()) as rt:
        t0 = time.perf_counter()
        outs = [step(pa.Variable(str(i))) for i in range(n)]
        await pa.gather(*outs)
        elapsed = time.perf_counter() - t0
        assert rt.stats().calls_completed == n
    return elapsed / n * 1000


async def chain(n: int) -> float:
    """Milliseconds per call for a chain of `n` dependent calls awaited at its end."""
    async with pa.Runtime(engines=engines()) as rt:
        t0 = time.perf_counter()
        v = pa.Variable("0")
        for _ in range(n):
            v = step(v)
        await v
        elapsed = time.perf_counter() - t0
        assert rt.stats().calls_completed == n
    return elapsed / n * 1000


async def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    """Run the cases and print a table; returns (case, ms per call) rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--chain", type=int, default=300)
    args = p.parse_args(argv)
    rows = [(f"{n} independent calls", await independent(n)) for n in args.sizes]
    rows.append((f"chain of {args.chain} calls", await chain(args.chain)))
    print("| case | ms per call |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} |")
    return rows


if __name__ == "__main__":
    asyncio.run(main())
