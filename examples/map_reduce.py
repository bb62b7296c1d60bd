"""Map-reduce summary (Parrot, OSDI 2024, §8.2): one summary per chunk, then one reduce.

    parrot-actors run examples/map_reduce.py [--url URL] -- [FILE] [CHUNKS] [WORDS]

The map calls form a task group (they all feed one reduce), so the service batches them for
throughput while the final summary is awaited with the latency objective.
"""

from __future__ import annotations

import sys

import parrot_actors as pa
from parrot_actors import apps


async def main() -> None:
    """Summarize a document (default: a chapter of the Python reference) in map-reduce form."""
    argv = [a for a in sys.argv[1:] if a != "--"]
    title, text = apps.demo_document(argv[0] if argv else None)
    chunks = int(argv[1]) if len(argv) > 1 else 4
    words = int(argv[2]) if len(argv) > 2 else 120
    maps, final = apps.map_reduce_summary(apps.chunk_words(text, chunks, words))
    print(f"=== {title} ===")
    print(await final.get(perf=pa.LATENCY))
    for i, m in enumerate(maps):
        print(f"  map {i}: {m.value().strip()[:160]}")
