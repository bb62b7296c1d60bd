"""WriteSnakeGame as a Ray job, against a running parrot_actors deployment.

    ray start --head                                   # once (see README, "Ray")
    ray job submit --working-dir . -- python examples/ray_app.py [--tiny] [--engines N]

It connects with `pa.Runtime.ray(address="auto")` (inside a job, "auto" is the job's cluster),
finds the named scheduler actor, creating it and its engines when absent (the embedded
SmolLM2 model, or a tiny random-weight model with --tiny), runs the app and prints its outputs:
in the job's logs (`ray job logs ID`), with a last `RESULT {json}` line for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import parrot_actors as pa
from parrot_actors import apps

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 512,
}
"""A 2-layer random-weight model on the default tokenizer (seconds to load; CI uses it)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The app's options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--task", default="a snake game", help="what to write code for")
    p.add_argument("--tiny", action="store_true", help="a new deployment uses the tiny model")
    p.add_argument("--engines", type=int, default=2, help="engines of a new deployment")
    return p.parse_args(argv)


def engine_configs(args: argparse.Namespace) -> list[pa.EngineConfig]:
    """The engines a new deployment gets (ignored when the deployment is running)."""
    extra = {"random_model": dict(TINY)} if args.tiny else {}
    return [pa.EngineConfig(name=f"engine{i}", **extra) for i in range(args.engines)]


async def main(argv: list[str] | None = None) -> dict[str, str]:
    """Run WriteSnakeGame on the deployment; returns and prints its outputs."""
    args = parse_args(argv)
    async with pa.Runtime.ray(address=args.address, engines=engine_configs(args)) as rt:
        t0 = time.perf_counter()
        code, test = apps.snake_game(args.task)
        result = {
            "code": await code.get(perf=pa.LATENCY),
            "test": await test.get(perf=pa.LATENCY),
        }
        print(f"--- code ---\n{result['code']}\n--- test ---\n{result['test']}")
        print(f"[end-to-end {time.perf_counter() - t0:.2f}s]")
        stats = await rt.stats()
        print(f"stats: calls={stats.calls_completed} generated={stats.generated_tokens}")
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    asyncio.run(main())
