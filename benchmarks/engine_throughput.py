"""Engine throughput against transformers' `generate`, same model, dtype and threads.

Prints one table: decode tokens/s at batch 1, 8 and 32 (64 new tokens per sequence from
~32-token prompts, prefill included on both sides), and prefill tokens/s for 512- and
2048-token prompts. Usage: `python benchmarks/engine_throughput.py [--repeats 2] [--json F]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

import torch
from tqdm import tqdm

from parrot_actors.engines import Engine, EngineConfig
from parrot_actors.engines.model_loader import default_model_path
from parrot_actors.messages import SamplingParams

NEW_TOKENS = 64


def prompts(tokenizer, batch: int) -> list[list[int]]:
    base = "Here is a short story about a robot who learns to paint. Chapter {}:"
    return [
        tokenizer.encode(base.format(i) + " It was", add_special_tokens=False) for i in range(batch)
    ]


async def ours_decode(engine: Engine, batch: int) -> float:
    ids = prompts(engine.tokenizer, batch)
    sp = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)

    async def one(i: int) -> int:
        await engine.fill(f"d{i}", token_ids=ids[i])
        r = await engine.generate(f"d{i}", sp)
        await engine.free_context(f"d{i}")
        return len(r.token_ids)

    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*[one(i) for i in range(batch)]))
    return n / (time.perf_counter() - t0)


def hf_decode(model, tokenizer, batch: int) -> float:
    ids = prompts(tokenizer, batch)
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=pad,
        )
    return (out.shape[1] - width) * batch / (time.perf_counter() - t0)


def long_ids(tokenizer, n: int) -> list[int]:
    text = " ".join(
        f"Sentence {i} describes a different fact about prime number {i * 7 + 1}."
        for i in range(n // 4)
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= n
    return ids[:n]


async def ours_prefill(engine: Engine, n: int) -> float:
    ids = long_ids(engine.tokenizer, n)
    t0 = time.perf_counter()
    await engine.fill("p", token_ids=ids)
    dt = time.perf_counter() - t0
    await engine.free_context("p")
    return n / dt


def hf_prefill(model, tokenizer, n: int) -> float:
    ids = torch.tensor([long_ids(tokenizer, n)])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True)
    return n / (time.perf_counter() - t0)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per cell (median)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    engine = await Engine.start(EngineConfig(max_batch_tokens=2048, prefix_caching=False))
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    tok = engine.tokenizer
    cells = [("decode", b) for b in (1, 8, 32)] + [("prefill", n) for n in (512, 2048)]
    rows = []
    for kind, size in tqdm(cells, desc="benchmark"):
        if kind == "decode":
            ours_fn = lambda size=size: ours_decode(engine, size)  # noqa: E731
            hf_fn = lambda size=size: hf_decode(model, tok, size)  # noqa: E731
        else:
            ours_fn = lambda size=size: ours_prefill(engine, size)  # noqa: E731
            hf_fn = lambda size=size: hf_prefill(model, tok, size)  # noqa: E731
        await ours_fn()  # warm-up
        hf_fn()
        ours = statistics.median([await ours_fn() for _ in range(args.repeats)])
        hf = statistics.median([hf_fn() for _ in range(args.repeats)])
        rows.append(
            {"kind": kind, "size": size, "ours": ours, "transformers": hf, "ratio": ours / hf}
        )
    await engine.close()
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        "SmolLM2-135M-Instruct float32"
    )
    print(f"{'measure':<28}{'parrot_actors':>16}{'transformers':>16}{'ratio':>8}")
    for r in rows:
        label = (
            f"decode tok/s, batch {r['size']}"
            if r["kind"] == "decode"
            else f"prefill tok/s, {r['size']} tokens"
        )
        print(f"{label:<28}{r['ours']:>16.1f}{r['transformers']:>16.1f}{r['ratio']:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
