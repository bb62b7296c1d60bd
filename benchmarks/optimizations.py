"""The paper's three optimizations on the real model, against the request-level baseline.

(a) 16 users' queries behind one production system prompt: mean latency with the baseline
    without sharing, the baseline with automatic prefix caching, and Parrot's prefix sharing.
(b) a 5-step chain: the baseline app awaits each call and pays a simulated network round trip
    (250 ms) before sending the next; Parrot submits all five at once. Alone, and beside a
    steady stream of background requests.
(c) an 8-chunk map-reduce summary: the baseline app sends one call at a time (the
    request-level app of docs/design.md), and, as a stronger baseline, all maps at once.
Each mode gets a fresh engine (an empty prefix cache). Usage:
`python benchmarks/optimizations.py [--system-tokens 1000] [--parts a,b,c] [--json F]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from tqdm import tqdm

import parrot_actors as pa
from parrot_actors import apps, data
from parrot_actors.engines import EngineConfig

RTT = 0.25
BASELINE = pa.SchedulerConfig(policy="fcfs", prefix_sharing=False, automatic_prefix_caching=False)
BASELINE_APC = pa.SchedulerConfig(
    policy="fcfs", prefix_sharing=False, automatic_prefix_caching=True
)
PARROT = pa.SchedulerConfig()


async def runtime(cfg: pa.SchedulerConfig, **engine_kw) -> pa.Runtime:
    engine = EngineConfig(**engine_kw)  # prefix caching: as the scheduler config says
    rt = pa.Runtime(engines=[engine], scheduler=cfg)
    await rt.__aenter__()
    return rt


async def timed(var: pa.Variable, perf: str = pa.LATENCY) -> float:
    t0 = time.perf_counter()
    await var.get(perf=perf)
    return time.perf_counter() - t0


# ---- (a) shared system prompt ----------------------------------------------------------------


def make_assistant(system: str) -> pa.variables.SemanticFunction:
    def assistant(query: pa.Input, answer: pa.Output):
        """set below"""

    assistant.__doc__ = system + "\nUser: {{query}}\nAssistant: {{answer}}"
    return pa.semantic_function(max_tokens=16, ignore_eos=True)(assistant)


async def part_a(system_tokens: int) -> dict:
    out = {}
    for label, cfg in (("baseline", BASELINE), ("baseline+APC", BASELINE_APC), ("parrot", PARROT)):
        rt = await runtime(cfg)
        try:
            system = data.truncate_tokens(
                rt.engines[0].tokenizer, data.system_prompt(), system_tokens
            )
            fn = make_assistant(system)
            queries = [
                f"Question {i}: what is the weather like in city number {i}?" for i in range(16)
            ]
            lat = await asyncio.gather(*[timed(fn(pa.Variable(q))) for q in queries])
            s = rt.stats()
            out[label] = {
                "mean_latency_s": statistics.mean(lat),
                "prefill": s.prefill_tokens,
                "reused": s.reused_tokens,
            }
        finally:
            await rt.__aexit__(None, None, None)
    return out


# ---- (b) chain with round trips --------------------------------------------------------------


@pa.semantic_function(max_tokens=24, ignore_eos=True)
def chain_step(prev: pa.Input, out: pa.Output):
    """Improve this sentence and make it one step more precise: {{prev}}
    Improved: {{out}}"""


@pa.semantic_function(max_tokens=64, ignore_eos=True)
def background(q: pa.Input, out: pa.Output):
    """Write a detailed paragraph about {{q}}.
    Paragraph: {{out}}"""


async def chain(rt: pa.Runtime, baseline: bool, steps: int = 5) -> float:
    t0 = time.perf_counter()
    v = pa.Variable("Parrot serves LLM applications.")
    for _ in range(steps):
        v = chain_step(v)
        if baseline:  # the client waits for each call, then pays a round trip
            await v.get(perf=pa.LATENCY)
            await asyncio.sleep(RTT)
    await v.get(perf=pa.LATENCY)
    if not baseline:
        await asyncio.sleep(RTT)  # the one round trip of the final get
    return time.perf_counter() - t0


async def background_load(stop: asyncio.Event, width: int) -> None:
    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            await background(pa.Variable(f"topic {w}-{i}")).get(perf=pa.THROUGHPUT)
            i += 1

    await asyncio.gather(*[worker(w) for w in range(width)])


async def part_b(width: int) -> dict:
    out = {}
    for load in (False, True):
        for label, cfg in (("baseline", BASELINE), ("parrot", PARROT)):
            rt = await runtime(cfg, max_running=8)
            try:
                stop = asyncio.Event()
                bg = asyncio.ensure_future(background_load(stop, width)) if load else None
                if bg:
                    await asyncio.sleep(2.0)  # let the background batch fill up
                t = await chain(rt, baseline=label == "baseline")
                stop.set()
                if bg:
                    await bg
                out[f"{label}{' +load' if load else ''}"] = {"e2e_s": t}
            finally:
                await rt.__aexit__(None, None, None)
    return out


# ---- (c) map-reduce --------------------------------------------------------------------------


async def part_c(chunks: int, words: int) -> dict:
    text = data.article(0)
    parts = apps.chunk_words(text, chunks, words)
    out = {}
    for label, cfg in (
        ("baseline", BASELINE),
        ("baseline-concurrent-maps", BASELINE),
        ("parrot", PARROT),
    ):
        rt = await runtime(cfg)
        try:
            t0 = time.perf_counter()
            reduce_fn = apps.make_reduce(len(parts))
            if label == "baseline":
                maps = []
                for c in parts:
                    maps.append(apps.summarize_chunk(pa.Variable(c)))
                    await maps[-1].get(perf=pa.LATENCY)
                    await asyncio.sleep(RTT)
                await reduce_fn(*maps).get(perf=pa.LATENCY)
            elif label == "baseline-concurrent-maps":
                maps = [apps.summarize_chunk(pa.Variable(c)) for c in parts]
                await pa.gather(*maps)
                await asyncio.sleep(RTT)
                await reduce_fn(*maps).get(perf=pa.LATENCY)
            else:
                _, final = apps.map_reduce_summary(parts)
                await final.get(perf=pa.LATENCY)
            await asyncio.sleep(RTT)
            out[label] = {"e2e_s": time.perf_counter() - t0}
        finally:
            await rt.__aexit__(None, None, None)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--system-tokens", type=int, default=1000, help="(a) system prompt tokens")
    ap.add_argument("--background", type=int, default=12, help="(b) background request streams")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--words", type=int, default=200, help="(c) words per chunk")
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--json")
    args = ap.parse_args()
    parts = args.parts.split(",")
    results = {}
    for p in tqdm(parts, desc="parts"):
        if p == "a":
            results["a"] = await part_a(args.system_tokens)
        elif p == "b":
            results["b"] = await part_b(args.background)
        elif p == "c":
            results["c"] = await part_c(args.chunks, args.words)
    print("\nSmolLM2-135M-Instruct, float32, CPU; ratios are baseline / parrot (higher is better)")
    if "a" in results:
        a = results["a"]
        p = a["parrot"]["mean_latency_s"]
        print(f"(a) shared system prompt ({args.system_tokens} tokens), 16 queries, mean latency:")
        for k, v in a.items():
            print(
                f"    {k:<26}{v['mean_latency_s']:8.2f}s  prefill {v['prefill']:>6}  "
                f"reused {v['reused']:>6}  ratio {v['mean_latency_s'] / p:5.2f}x"
            )
    if "b" in results:
        b = results["b"]
        print("(b) 5-step chain, 250 ms round trip per baseline call:")
        for suffix in ("", " +load"):
            base, par = b[f"baseline{suffix}"]["e2e_s"], b[f"parrot{suffix}"]["e2e_s"]
            print(
                f"    {'alone' if not suffix else 'background load':<26}baseline {base:6.2f}s"
                f"  parrot {par:6.2f}s  ratio {base / par:5.2f}x"
            )
    if "c" in results:
        c = results["c"]
        p = c["parrot"]["e2e_s"]
        print(f"(c) map-reduce, {args.chunks} chunks x {args.words} words:")
        for k, v in c.items():
            print(f"    {k:<26}{v['e2e_s']:8.2f}s  ratio {v['e2e_s'] / p:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
