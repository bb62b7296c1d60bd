"""WriteSnakeGame (Parrot, OSDI 2024, Fig. 3): code, then test code that reads the code.

    parrot-actors run examples/snake_game.py                          # embedded
    parrot-actors run examples/snake_game.py --url http://127.0.0.1:9000  # a running service

Both calls are submitted before anything is awaited: the service starts the test call the
moment the code variable resolves, with no round trip to this client.
"""

from __future__ import annotations

import sys

import parrot_actors as pa
from parrot_actors import apps


async def main() -> None:
    """Submit both calls, then await the two outputs with the latency objective."""
    task = sys.argv[1] if len(sys.argv) > 1 else "a snake game"
    code, test = apps.snake_game(task)
    print("--- code ---")
    print(await code.get(perf=pa.LATENCY))
    print("--- test ---")
    print(await test.get(perf=pa.LATENCY))
