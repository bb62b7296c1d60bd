"""The `parrot-actors` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time


async def demo(document: str | None = None, chunks: int = 4, words: int = 120) -> None:
    """The main job: WriteSnakeGame and a map-reduce summary on the embedded model."""
    import parrot_actors as pa
    from parrot_actors import apps

    print("Starting the embedded runtime (SmolLM2-135M-Instruct; the first run converts it)...")
    async with pa.Runtime() as rt:
        t0 = time.perf_counter()
        code, test = apps.snake_game()
        print(f"\n=== WriteSnakeGame ===\n--- code ---\n{await code.get(perf=pa.LATENCY)}")
        print(f"--- test ---\n{await test.get(perf=pa.LATENCY)}")
        print(f"[end-to-end {time.perf_counter() - t0:.2f}s]")

        title, text = apps.demo_document(document)
        parts = apps.chunk_words(text, chunks, words)
        t0 = time.perf_counter()
        maps, final = apps.map_reduce_summary(parts)
        print(f"\n=== Map-reduce summary of {title!r}: {len(parts)} chunks x {words} words ===")
        print(await final.get(perf=pa.LATENCY))
        for i, m in enumerate(maps):
            print(f"  map {i}: {m.value().strip()[:160]}")
        print(f"[end-to-end {time.perf_counter() - t0:.2f}s]")
        stats = rt.stats()
        print(
            f"\nstats: calls={stats.calls_completed} prefill={stats.prefill_tokens} "
            f"reused={stats.reused_tokens} generated={stats.generated_tokens}"
        )
        for name, e in stats.engines.items():
            print(f"  {name}: {e}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `parrot-actors`; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="parrot-actors", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo",
        help="run the main job (WriteSnakeGame and a map-reduce summary) "
        "on the embedded default model",
    )
    p.add_argument(
        "--document",
        help="text file to summarize (default: a chapter of the "
        "Python reference that ships with Python)",
    )
    p.add_argument("--chunks", type=int, default=4, help="map calls (default 4)")
    p.add_argument("--words", type=int, default=120, help="words per chunk (default 120)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        asyncio.run(demo(args.document, args.chunks, args.words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
