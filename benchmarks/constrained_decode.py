"""Overhead of constrained decoding in the engine: decode tokens/s with and without a JSON
Schema constraint, at batch 1 and 32, and the time the engine loop spends masking per step.

Each cell first runs the constrained requests (greedy, one JSON Schema with a nested object,
an enum, integer bounds and a fixed-length array, so answers are long and alike), records
each answer's length, then runs the same prompts unconstrained with exactly those lengths
(`ignore_eos`), so both sides decode the same tokens per request in the same batches. tok/s
counts generated tokens over the wall time of the whole batch (fill included on both sides).
Mask time is `Grammars.masked` (bitmask fill for every constrained row plus one batched
apply), timed around each call. The first constrained request of a run builds llguidance's
view of the vocabulary (~0.4 s); a warm-up request pays it before timing.

Usage: `python benchmarks/constrained_decode.py [--batches 1 32] [--repeats 2] [--json F]`.
Source of the method: the issue's benchmark (decode with/without the constraint at batch 1
and 32); llguidance's masks (github.com/guidance-ai/llguidance).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from parrot_actors.engines import Engine, EngineConfig
from parrot_actors.engines.grammar import Grammars
from parrot_actors.messages import Grammar, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["mammal", "bird", "fish", "insect"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "habitat": {
            "type": "object",
            "properties": {
                "place": {"type": "string", "maxLength": 16},
                "wet": {"type": "boolean"},
            },
            "required": ["place", "wet"],
            "additionalProperties": False,
        },
        "foods": {
            "type": "array",
            "items": {"type": "string", "maxLength": 10},
            "minItems": 3,
            "maxItems": 3,
        },
    },
    "required": ["name", "kind", "legs", "habitat", "foods"],
    "additionalProperties": False,
}
ANIMALS = ["cat", "eagle", "salmon", "ant", "dog", "owl", "shark", "bee"]
MAX_TOKENS = 96


class MaskTimer:
    """Wraps `Grammars.masked` to record each call's wall time (seconds) and rows."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []
        self._orig = Grammars.masked

    def __enter__(self) -> MaskTimer:
        timer = self

        def timed(grammars: Grammars, logits: torch.Tensor, matchers: list[Any]) -> torch.Tensor:
            t0 = time.perf_counter()
            out = timer._orig(grammars, logits, matchers)
            timer.calls.append((time.perf_counter() - t0, len(matchers)))
            return out

        Grammars.masked = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Grammars.masked = self._orig  # type: ignore[method-assign]


def prompt(engine: Engine, i: int) -> list[int]:
    text = f"Describe the {ANIMALS[i % len(ANIMALS)]} number {i} as JSON."
    return engine.tokenize(engine.chat_prompt(text), first=True)


async def run(engine: Engine, batch: int, lengths: list[int] | None) -> tuple[float, list[int]]:
    """Generated tokens/s of `batch` requests: constrained when `lengths` is None, else
    unconstrained with exactly those lengths. Returns (tok/s, each answer's length)."""
    grammar = Grammar(json_schema=json.dumps(SCHEMA))

    async def one(i: int) -> int:
        cid = f"b{batch}-{i}-{lengths is None}"
        await engine.fill(cid, token_ids=prompt(engine, i))
        if lengths is None:
            sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, grammar=grammar)
        else:
            sp = SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)
        result = await engine.generate(cid, sp)
        await engine.free_context(cid)
        if lengths is None:
            json.loads(result.text)  # the constraint held
        return len(result.token_ids)

    t0 = time.perf_counter()
    made = await asyncio.gather(*(one(i) for i in range(batch)))
    return sum(made) / (time.perf_counter() - t0), list(made)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    engine = await Engine.start(EngineConfig(kv_cache_bytes=512 << 20))
    rows: dict[str, Any] = {}
    try:
        await run(engine, 1, None)  # warm-up: llguidance's vocabulary, the schema's compile
        for batch in tqdm(args.batches, desc="batch sizes"):
            free, constrained, per_row, per_step = [], [], [], []
            for _ in range(args.repeats):
                with MaskTimer() as timer:
                    tps, lengths = await run(engine, batch, None)
                constrained.append(tps)
                free.append((await run(engine, batch, lengths))[0])
                per_step += [t for t, _ in timer.calls]
                per_row += [t / n for t, n in timer.calls]
            rows[str(batch)] = {
                "free_tok_s": statistics.median(free),
                "constrained_tok_s": statistics.median(constrained),
                "overhead": 1 - statistics.median(constrained) / statistics.median(free),
                "mask_ms_per_step": 1e3 * statistics.median(per_step),
                "mask_us_per_request_step": 1e6 * statistics.median(per_row),
                "mean_answer_tokens": statistics.mean(lengths),
            }
    finally:
        await engine.close()
    return rows


def report(rows: dict[str, Any]) -> str:
    """The results as a markdown table."""
    lines = [
        "| batch | decode tok/s free | constrained | overhead | mask ms/step | mask us/req/step |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, r in rows.items():
        lines.append(
            f"| {batch} | {r['free_tok_s']:.1f} | {r['constrained_tok_s']:.1f} | "
            f"{100 * r['overhead']:.1f}% | {r['mask_ms_per_step']:.2f} | "
            f"{r['mask_us_per_request_step']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    rows = asyncio.run(main(args))
    print(f"machine: {platform.processor() or platform.machine()}, threads {args.threads}")
    print(report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
