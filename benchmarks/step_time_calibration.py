"""Calibrate the step-time model against a real engine: fit it online, test it on held-out steps.

Runs a real engine (this CPU and the embedded model by default; `--device cuda` on a GPU)
through two mixed workloads with different seeds: batches of 1-32 sequences, prompts of 16-1024
tokens arriving while others decode, so steps mix chunked prefills and decodes. Every step's
shape and measured time lands in the engine's step-time window (`EngineCore.step_fit`, the
same records `/metrics` shows). The cpu-fitted model is fitted on the first workload's steps
and evaluated on the second's (held out: other prompts, other batch mixes), per batch size too.
With `--predict-gpu GPU` the step-time model of that GPU for the same model shape is evaluated
on the same measured steps (no fitting: its error against measurement, for
`scripts/gpu_check.sh`).

Writes the fit (`--out`, JSON, `step_time.save_fit`) for `--sim cpu-fitted --sim-fit FILE`.
Usage: `python benchmarks/step_time_calibration.py [--requests 48] [--out out/step_fit.json]
[--device cuda --dtype bfloat16 --random-model JSON --predict-gpu h100]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import subprocess
from pathlib import Path

import torch
from tqdm import tqdm

from parrot_actors.engines import Engine, EngineConfig
from parrot_actors.engines.step_fit import StepTimeFit, save_fit
from parrot_actors.engines.step_time import ModelShape, StepShape, StepTimeModel
from parrot_actors.messages import SamplingParams


async def workload(engine: Engine, seed: int, requests: int, bar: tqdm) -> None:
    """`requests` generations in waves of 1-32 concurrent sequences with arrivals spread over
    2 s, so steps mix prefill chunks (16-1024-token prompts, alone or several) with decodes of
    8-96 tokens; every third wave's prompts arrive one by one with nothing else running."""
    rng = random.Random(seed)
    words = engine.tokenize(" the quick brown fox jumps over a lazy dog while it rains" * 200)
    done = 0
    while done < requests:
        batch = min(rng.choice([1, 2, 4, 8, 16, 32]), requests - done)

        async def one(cid: str, delay: float) -> None:
            await asyncio.sleep(delay)  # staggered: prefills land mid-decode
            n = rng.choice([16, 64, 128, 256, 512, 1024])
            start = rng.randrange(0, len(words) - n)
            await engine.fill(cid, token_ids=words[start : start + n])
            await engine.generate(
                cid, SamplingParams(max_tokens=rng.choice([8, 32, 96]), ignore_eos=True)
            )
            await engine.free_context(cid)
            bar.update(1)

        names = [f"s{seed}-{done}-{i}" for i in range(batch)]
        if rng.random() < 1 / 3:  # prefills (and their decodes) alone, one request at a time
            for cid in names:
                await one(cid, 0.0)
        else:
            await asyncio.gather(*(one(cid, 2.0 * rng.random()) for cid in names))
        done += batch


def error_of(model: StepTimeModel, samples: list[tuple[StepShape, float]]) -> dict[str, float]:
    """Median and p90 relative error of `model` on `samples` (shape, measured s)."""
    rel = sorted(abs(model.predict(s) - t) / t for s, t in samples)
    return {
        "steps": len(rel),
        "median_abs_error": statistics.median(rel),
        "p90_abs_error": rel[min(len(rel) - 1, int(0.9 * len(rel)))],
    }


def by_batch(model: StepTimeModel, samples: list[tuple[StepShape, float]]) -> dict[str, dict]:
    """`error_of` per bucket of sequences in the step, with measured and predicted medians."""
    buckets: dict[str, list[tuple[StepShape, float]]] = {}
    for s, t in samples:
        n = len(s.prefill) + len(s.decode)
        key = "1" if n == 1 else "2-4" if n <= 4 else "5-16" if n <= 16 else "17+"
        buckets.setdefault(key, []).append((s, t))
    out = {}
    for key in ("1", "2-4", "5-16", "17+"):
        rows = buckets.get(key)
        if rows:
            err = error_of(model, rows)
            err["measured_ms"] = 1e3 * statistics.median(t for _, t in rows)
            err["predicted_ms"] = 1e3 * statistics.median(model.predict(s) for s, _ in rows)
            out[key] = err
    return out


def model_shape(engine: Engine, args: argparse.Namespace) -> ModelShape:
    """The served model's shape (its config), in the engine's dtype."""
    if args.random_model:
        cfg = dict(json.loads(args.random_model))
        cfg.setdefault("max_position_embeddings", 8192)
        cfg["torch_dtype"] = args.dtype
        return ModelShape.from_hf_config(cfg)
    if args.model == "default":
        return ModelShape.named("smollm2-135m")
    return ModelShape.from_hf_config(Path(args.model) / "config.json").with_dtype(args.dtype)


async def main(args: argparse.Namespace) -> dict:
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch_tokens=args.max_batch_tokens,
        prefix_caching=False,
        random_model=json.loads(args.random_model) if args.random_model else None,
    )
    engine = await Engine.start(config)
    try:
        shape = model_shape(engine, args)
        window = engine.core.step_fit
        for seed in (args.seed, args.seed + 1):
            with tqdm(total=args.requests, desc=f"workload seed {seed}") as bar:
                await workload(engine, seed, args.requests, bar)
            if seed == args.seed:
                train = window.samples()
        held = window.samples()[len(train) :]
        if len(train) + len(held) >= window.window:
            raise SystemExit(f"more than {window.window} steps: lower --requests")
    finally:
        await engine.close()
    fit = StepTimeFit(shape, window=max(len(train), 1), min_samples=32)
    for s, t in train:
        fit.record(s, t)
    fitted = fit.fit() or StepTimeModel.for_device(
        "cpu-fitted", shape, dtype=None, coefficients=fit.coefficients
    )
    assert fit.coefficients is not None
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, {args.device}",
        "commit": _commit(),
        "model": shape.name,
        "train_steps": len(train),
        "coefficients": fit.coefficients,
        "train_error": error_of(fitted, train),
        "held_out_error": error_of(fitted, held),
        "held_out_by_batch": by_batch(fitted, held),
        # Every measured step, to refit or check offline: (prefill, decode, shared, rows, s).
        "steps": {
            name: [[s.prefill, s.decode, s.shared, s.logit_rows, t] for s, t in rows]
            for name, rows in (("train", train), ("held_out", held))
        },
    }
    if args.predict_gpu:
        gpu = StepTimeModel.for_device(args.predict_gpu, shape, dtype=args.dtype)
        everything = train + held
        report["gpu_model"] = {
            "gpu": args.predict_gpu,
            "error": error_of(gpu, everything),
            "by_batch": by_batch(gpu, everything),
        }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_fit(args.out, shape, fit.coefficients, fit.error)
        report["fit_file"] = args.out
    return report


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True)
        return out.stdout.decode().strip()
    except OSError:
        return "unknown"


def print_report(r: dict) -> None:
    print(f"\nstep-time calibration: {r['model']} on {r['machine']} at {r['commit']}")
    print("coefficients (s per unit):", {k: f"{v:.3g}" for k, v in r["coefficients"].items()})
    for name in ("train_error", "held_out_error"):
        e = r[name]
        print(
            f"{name:<15} {e['steps']:>5} steps  median |err| {100 * e['median_abs_error']:.1f}%"
            f"  p90 {100 * e['p90_abs_error']:.1f}%"
        )
    print("held out, by sequences per step: measured / predicted median ms, median |err|")
    for key, e in r["held_out_by_batch"].items():
        print(
            f"  {key:>5}: {e['steps']:>4} steps  {e['measured_ms']:8.2f} / "
            f"{e['predicted_ms']:8.2f} ms  {100 * e['median_abs_error']:.1f}%"
        )
    if "gpu_model" in r:
        g = r["gpu_model"]
        print(f"{g['gpu']} step-time model (not fitted) on the measured steps:")
        print(f"  all: median |err| {100 * g['error']['median_abs_error']:.1f}%")
        for key, e in g["by_batch"].items():
            print(
                f"  {key:>5}: {e['steps']:>4} steps  {e['measured_ms']:8.2f} / "
                f"{e['predicted_ms']:8.2f} ms  {100 * e['median_abs_error']:.1f}%"
            )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--random-model", help="LlamaConfig fields of a random-weight model (JSON)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=48, help="requests per workload")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--predict-gpu", help="also evaluate this GPU's step-time model (no fit)")
    ap.add_argument("--out", default="out/step_fit.json", help="fit JSON ('' = none)")
    ap.add_argument("--json", help="write the report here too")
    a = ap.parse_args()
    rep = asyncio.run(main(a))
    print_report(rep)
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2) + "\n")
