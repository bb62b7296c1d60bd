"""The `parrot-actors` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time


async def _engine_demo() -> None:
    from parrot_actors.engines import Engine, EngineConfig
    from parrot_actors.messages import SamplingParams

    print("Loading the embedded SmolLM2-135M-Instruct (the first run converts it, ~30 s)...")
    engine = await Engine.start(EngineConfig())
    system = (
        "<|im_start|>system\nYou are a helpful assistant who answers in one short "
        "paragraph.<|im_end|>\n"
    )
    questions = [
        "What is the capital of France?",
        "Why is the sky blue?",
        "Give me a tip for writing clean Python code.",
    ]
    t0 = time.perf_counter()
    await engine.fill("system", text=system)

    async def ask(i: int, q: str):
        cid = f"user{i}"
        await engine.fill(
            cid,
            text=f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
            parent_context_id="system",
        )
        return await engine.generate(cid, SamplingParams(max_tokens=64))

    results = await asyncio.gather(*[ask(i, q) for i, q in enumerate(questions)])
    for q, r in zip(questions, results):
        print(f"\nQ: {q}\nA: {r.text.strip()}  [{r.completion_tokens} tokens, {r.finish_reason}]")
    print(f"\nend-to-end {time.perf_counter() - t0:.2f}s; engine stats: {engine.stats()}")
    await engine.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `parrot-actors`; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="parrot-actors", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the main job on the embedded default model")
    args = parser.parse_args(argv)
    if args.command == "demo":
        asyncio.run(_engine_demo())
    return 0


if __name__ == "__main__":
    sys.exit(main())
