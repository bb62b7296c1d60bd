"""GPU benchmarks: FlashInfer cascade vs plain paged decode attention, and engine decode speed.

(a) Attention, Llama-7B head shapes (32 query heads, 32 KV heads, head_dim 128, bf16, page 16):
    a batch of B decodes that all fork one P-token prefix and add a 64-token suffix each
    (kv_len = P + 64 per request). Timed through `FlashInferAttention.forward` exactly as the
    engine calls it, once with a plain layout (`BatchDecodeWithPagedKVCacheWrapper` reads the
    shared pages once per request) and once with `plan_cascade` groups
    (`MultiLevelCascadeAttentionWrapper` reads them once per batch; FlashInfer docs, "Cascade
    Inference" blog 2024). A third run gives every request its own copy of the prefix (distinct
    pages), so plain decode must stream all of its KV from HBM: its bytes / time is compared
    with the device copy bandwidth (a large tensor copy, bytes read + written / time).
    Timing: CUDA events around one call, the GPU held busy by `torch.cuda._sleep` while the
    host enqueues (so host launch overhead is hidden), median of --iters calls after --warmup.
(b) Engine decode throughput with random weights at 7B shapes (hidden 4096, 32 layers, 32
    heads, intermediate 11008, bf16) through the `Engine` API at batch 1, 8, 32, 64: B contexts
    of --prompt tokens generate --gen-tokens each concurrently; tokens/s = B * gen / wall time.

`--prewarm 32,8,128,bfloat16 ...` only JIT-builds FlashInfer's kernel modules for those head
shapes, concurrently (used by scripts/gpu_check.sh before the tests).

Prints a table, writes gpu_attention.json and gpu_attention.png to --out. Without a CUDA
device it prints "no CUDA device: nothing to measure" and exits 0. Exits 1 if flashinfer does
not import on a CUDA machine.

Targets printed beside the numbers: cascade >= 10x plain paged at batch 64 / 4k prefix;
decode attention >= 70% of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BATCHES = (8, 16, 32, 64, 128)
PREFIXES = (1024, 4096, 16384)
ENGINE_BATCHES = (1, 8, 32, 64)
HEADS = (32, 32, 128)  # Llama-7B: q heads, kv heads, head_dim
PAGE = 16
SUFFIX = 64
TARGET_SPEEDUP = 10.0
TARGET_BW_FRACTION = 0.70
LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (JSON, PNG)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per config")
    p.add_argument("--iters", type=int, default=20, help="timed calls per config (median)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--prefixes", type=int, nargs="+", default=list(PREFIXES))
    p.add_argument("--engine-batches", type=int, nargs="+", default=list(ENGINE_BATCHES))
    p.add_argument("--prompt", type=int, default=128, help="engine prompt tokens per context")
    p.add_argument("--gen-tokens", type=int, default=64, help="engine tokens per context")
    p.add_argument("--kv-cache-gib", type=float, default=8.0, help="engine KV cache budget")
    p.add_argument("--engine-attention", default="flashinfer", choices=["flashinfer", "torch"])
    p.add_argument("--skip-attention", action="store_true", help="skip part (a)")
    p.add_argument("--skip-engine", action="store_true", help="skip part (b)")
    p.add_argument(
        "--prewarm",
        nargs="+",
        metavar="HQ,HKV,HD,DTYPE",
        help="only JIT-build FlashInfer's modules for these head shapes (e.g. 32,8,128,bfloat16),"
        " all in parallel, then exit",
    )
    return p.parse_args(argv)


def gpu_time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median GPU time of `fn()` in milliseconds (CUDA events; the stream is kept busy with
    `torch.cuda._sleep` while the host enqueues, so launch overhead is not counted)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU cycles: the host runs ahead meanwhile
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _prewarm_one(spec: str) -> str:
    """Plan and run one tiny step (a prefill, a 2-member cascade group and a lone decode) for
    head shape `spec` ("q_heads,kv_heads,head_dim,dtype"), so FlashInfer JIT-builds and loads
    every module that shape needs. Returns a line with the seconds it took."""
    import torch

    from parrot_actors.cuda.flashinfer_backend import FlashInferAttention
    from parrot_actors.cuda.layout import BatchLayout, CascadeGroup, SeqLayout

    hq, hkv, hd, dt = spec.split(",")
    dtype = getattr(torch, dt)
    t = time.perf_counter()
    backend = FlashInferAttention(int(hq), int(hkv), int(hd), torch.device("cuda"), dtype)
    layout = BatchLayout(
        PAGE,
        prefills=(SeqLayout(3, 3, (0,)),),
        decodes=(SeqLayout(1, 20, (1, 2)), SeqLayout(1, 18, (1, 3)), SeqLayout(1, 5, (4,))),
        cascade_groups=(CascadeGroup((0, 1), 1), CascadeGroup((2,), 0)),
    )
    backend.plan(layout)
    kv = torch.zeros(8, 2, PAGE, int(hkv), int(hd), dtype=dtype, device="cuda")
    q = torch.zeros(layout.num_tokens, int(hq), int(hd), dtype=dtype, device="cuda")
    backend.forward(q, kv)
    torch.cuda.synchronize()
    return f"{spec}: {time.perf_counter() - t:.0f} s"


def prewarm(specs: list[str]) -> int:
    """JIT-build the FlashInfer modules of every head shape in `specs` concurrently (one thread
    each; nvcc runs in subprocesses, so the threads overlap). Returns 0, or 1 if any failed."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    failed = 0
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(_prewarm_one, s) for s in specs]
        for spec, fut in zip(specs, futures, strict=True):
            try:
                print("prewarm", fut.result(), flush=True)
            except Exception as e:  # report every config, not just the first failure
                failed = 1
                print(f"prewarm {spec} FAILED: {type(e).__name__}: {e}", flush=True)
    print(f"prewarm done in {time.perf_counter() - t0:.0f} s", flush=True)
    return failed


def copy_bandwidth_gbps(warmup: int, iters: int, nbytes: int = 2 << 30) -> float:
    """Device copy bandwidth in GB/s (1e9 bytes/s): bytes read + written by `dst.copy_(src)`
    of an `nbytes` tensor, divided by its median time."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = gpu_time_ms(functools.partial(dst.copy_, src), warmup, iters)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def time_forward(backend: Any, layout: Any, q: Any, kv: Any, warmup: int, iters: int) -> float:
    """Plan `layout` once, then the median GPU ms of `backend.forward(q, kv)` (q `[batch,
    heads, head_dim]`, kv `[blocks, 2, page, kv_heads, head_dim]`), as one engine layer."""
    backend.plan(layout)
    return gpu_time_ms(functools.partial(backend.forward, q, kv), warmup, iters)


def kv_bytes_per_token(heads: tuple[int, int, int] = HEADS, elem: int = 2) -> int:
    """Bytes of K and V of one token in one layer: 2 * kv_heads * head_dim * elem."""
    return 2 * heads[1] * heads[2] * elem


def bench_attention(args: argparse.Namespace, copy_gbps: float) -> list[dict[str, Any]]:
    """Part (a): one row per (prefix, batch) with times in ms and bandwidths in GB/s."""
    import torch
    from tqdm import tqdm

    from parrot_actors.cuda.flashinfer_backend import FlashInferAttention
    from parrot_actors.cuda.layout import BatchLayout, SeqLayout, plan_cascade

    hq, hkv, d = HEADS
    dev, dtype = torch.device("cuda"), torch.bfloat16
    backend = FlashInferAttention(hq, hkv, d, dev, dtype)
    tok_bytes = kv_bytes_per_token()
    suffix_pages = -(-SUFFIX // PAGE)
    rows: list[dict[str, Any]] = []
    configs = [(p, b) for p in args.prefixes for b in args.batches]
    for prefix, batch in tqdm(configs, desc="attention", unit="cfg"):
        kv_len = prefix + SUFFIX
        pp = -(-prefix // PAGE)
        if prefix % PAGE:
            raise ValueError(f"prefix {prefix} must be a multiple of the page size {PAGE}")
        # Shared: prefix pages [0, pp), request i's own pages after them.
        shared = tuple(range(pp))
        seqs = [
            SeqLayout(
                1, kv_len, shared + tuple(pp + i * suffix_pages + j for j in range(suffix_pages))
            )
            for i in range(batch)
        ]
        num_blocks = pp + batch * suffix_pages
        kv = torch.empty(num_blocks, 2, PAGE, hkv, d, dtype=dtype, device=dev).normal_()
        q = torch.randn(batch, hq, d, dtype=dtype, device=dev)
        plain = BatchLayout(PAGE, decodes=tuple(seqs))
        ordered, groups = plan_cascade(seqs, PAGE)
        cascade = BatchLayout(PAGE, decodes=tuple(ordered), cascade_groups=tuple(groups))
        t_plain = time_forward(backend, plain, q, kv, args.warmup, args.iters)
        t_casc = time_forward(backend, cascade, q, kv, args.warmup, args.iters)
        del kv
        logical = batch * kv_len * tok_bytes  # what plain decode reads (shared pages re-read)
        unique = (prefix + batch * SUFFIX) * tok_bytes  # what cascade must read
        row: dict[str, Any] = {
            "prefix": prefix,
            "batch": batch,
            "plain_ms": t_plain,
            "cascade_ms": t_casc,
            "speedup": t_plain / t_casc,
            "plain_logical_GBps": logical / (t_plain * 1e-3) / 1e9,
            "cascade_unique_GBps": unique / (t_casc * 1e-3) / 1e9,
            "cascade_unique_frac_of_copy": unique / (t_casc * 1e-3) / 1e9 / copy_gbps,
        }
        # Distinct KV: every request owns all its pages, so plain decode streams it from HBM.
        free, _ = torch.cuda.mem_get_info()
        if logical <= 0.6 * free:
            pages = -(-kv_len // PAGE)
            kv = torch.empty(batch * pages, 2, PAGE, hkv, d, dtype=dtype, device=dev).normal_()
            distinct = BatchLayout(
                PAGE,
                decodes=tuple(
                    SeqLayout(1, kv_len, tuple(range(i * pages, (i + 1) * pages)))
                    for i in range(batch)
                ),
            )
            t_dist = time_forward(backend, distinct, q, kv, args.warmup, args.iters)
            del kv
            bw = logical / (t_dist * 1e-3) / 1e9
            row.update(distinct_ms=t_dist, distinct_GBps=bw, distinct_frac_of_copy=bw / copy_gbps)
        else:
            row.update(distinct_ms=None, distinct_GBps=None, distinct_frac_of_copy=None)
        torch.cuda.empty_cache()
        rows.append(row)
    return rows


async def _engine_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from parrot_actors.engines import Engine, EngineConfig
    from parrot_actors.messages import SamplingParams

    cfg = EngineConfig(
        random_model=LLAMA_7B,
        device="cuda",
        dtype="bfloat16",
        attention=args.engine_attention,
        kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
        max_running=max(64, *args.engine_batches),
    )
    t0 = time.perf_counter()
    engine = await Engine.start(cfg)
    print(f"engine start (random 7B weights): {time.perf_counter() - t0:.1f} s")
    rows: list[dict[str, Any]] = []
    try:
        await engine.fill("warm", token_ids=list(range(1, 33)))
        await engine.generate("warm", SamplingParams(max_tokens=4, ignore_eos=True))
        await engine.free_context("warm")
        sp = SamplingParams(max_tokens=args.gen_tokens, ignore_eos=True)
        for batch in tqdm(args.engine_batches, desc="engine", unit="batch"):
            ids = [f"b{batch}_{i}" for i in range(batch)]
            await asyncio.gather(
                *(
                    engine.fill(
                        c, token_ids=[(i * 7919 + j * 31) % 31000 + 1 for j in range(args.prompt)]
                    )
                    for i, c in enumerate(ids)
                )
            )
            t = time.perf_counter()
            res = await asyncio.gather(*(engine.generate(c, sp) for c in ids))
            wall = time.perf_counter() - t
            tokens = sum(len(r.token_ids) for r in res)
            rows.append(
                {
                    "batch": batch,
                    "tokens": tokens,
                    "wall_s": wall,
                    "tokens_per_s": tokens / wall,
                    "per_seq_tokens_per_s": tokens / wall / batch,
                }
            )
            for c in ids:
                await engine.free_context(c)
    finally:
        await engine.close()
    return rows


def bench_engine(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Part (b): one row per batch with generated tokens, wall seconds and tokens/s."""
    return asyncio.run(_engine_rows(args))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def report(result: dict[str, Any]) -> str:
    """The printed table and target lines."""
    lines = [
        f"device: {result['device']}  torch {result['torch']}  flashinfer {result['flashinfer']}",
        f"copy bandwidth (read+write): {result['copy_GBps']:.0f} GB/s",
    ]
    att = result.get("attention") or []
    if att:
        lines.append(
            "prefix batch | plain ms cascade ms speedup | plain logical GB/s | cascade unique "
            "GB/s (%copy) | distinct-KV plain ms GB/s (%copy)"
        )
        for r in att:
            lines.append(
                f"{r['prefix']:6d} {r['batch']:5d} | {r['plain_ms']:8.3f} {r['cascade_ms']:10.3f} "
                f"{r['speedup']:7.1f}x | {r['plain_logical_GBps']:18.0f} | "
                f"{r['cascade_unique_GBps']:8.0f} "
                f"({100 * r['cascade_unique_frac_of_copy']:5.1f}%) | "
                f"{_fmt(r['distinct_ms'], '8.3f')} {_fmt(r['distinct_GBps'], '6.0f')} "
                f"({_fmt(_pct(r['distinct_frac_of_copy']), '5.1f')}%)"
            )
    eng = result.get("engine") or []
    if eng:
        lines.append(
            f"engine decode ({result.get('engine_attention')}), 7B shapes, random weights:"
        )
        for r in eng:
            lines.append(
                f"  batch {r['batch']:3d}: {r['tokens_per_s']:9.1f} tokens/s "
                f"({r['per_seq_tokens_per_s']:.1f} per sequence, {r['wall_s']:.2f} s)"
            )
    if result.get("engine_error"):
        lines.append(f"engine benchmark failed: {result['engine_error']}")
    for name, t in result.get("targets", {}).items():
        status = "n/a" if t["value"] is None else ("MET" if t["met"] else "MISSED")
        lines.append(f"target {name}: {_fmt(t['value'], '.2f')} (goal {t['goal']}) {status}")
    return "\n".join(lines)


def targets(att: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The two targets, evaluated where measured (value None when the config was not run)."""
    at = {(r["prefix"], r["batch"]): r for r in att}
    r = at.get((4096, 64))
    speed = r["speedup"] if r else None
    bw = r["distinct_frac_of_copy"] if r else None
    if bw is None:
        fracs = [x["distinct_frac_of_copy"] for x in att if x["distinct_frac_of_copy"]]
        bw = max(fracs) if fracs else None
    return {
        "cascade_speedup_b64_p4k": {
            "value": speed,
            "goal": f">= {TARGET_SPEEDUP}x",
            "met": speed is not None and speed >= TARGET_SPEEDUP,
        },
        "decode_attention_bw_fraction_of_copy_b64_p4k": {
            "value": bw,
            "goal": f">= {TARGET_BW_FRACTION}",
            "met": bw is not None and bw >= TARGET_BW_FRACTION,
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Write a 2x2 figure: time per call, speedup, bandwidth fraction, engine tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att, eng = result.get("attention") or [], result.get("engine") or []
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    for prefix in sorted({r["prefix"] for r in att}):
        rs = [r for r in att if r["prefix"] == prefix]
        b = [r["batch"] for r in rs]
        ax[0, 0].plot(b, [r["plain_ms"] for r in rs], "o--", label=f"plain {prefix}")
        ax[0, 0].plot(b, [r["cascade_ms"] for r in rs], "o-", label=f"cascade {prefix}")
        ax[0, 1].plot(b, [r["speedup"] for r in rs], "o-", label=f"prefix {prefix}")
        ax[1, 0].plot(
            b,
            [r["distinct_frac_of_copy"] or float("nan") for r in rs],
            "o-",
            label=f"plain, distinct KV {prefix}",
        )
    ax[0, 0].set(
        xscale="log",
        yscale="log",
        xlabel="batch",
        ylabel="ms per call",
        title="decode attention (32x32x128 bf16)",
    )
    ax[0, 1].axhline(TARGET_SPEEDUP, color="gray", ls=":")
    ax[0, 1].set(xscale="log", xlabel="batch", ylabel="plain / cascade", title="cascade speedup")
    ax[1, 0].axhline(TARGET_BW_FRACTION, color="gray", ls=":")
    ax[1, 0].set(
        xscale="log",
        xlabel="batch",
        ylabel="fraction of copy bandwidth",
        title=f"HBM efficiency (copy {result['copy_GBps']:.0f} GB/s)",
    )
    if eng:
        ax[1, 1].plot([r["batch"] for r in eng], [r["tokens_per_s"] for r in eng], "o-")
    ax[1, 1].set(xlabel="batch", ylabel="tokens/s", title="engine decode, 7B shapes")
    for a in ax.flat:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns the process exit code (0, or 1 without flashinfer)."""
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    try:
        import flashinfer
    except ImportError as e:
        print(f"flashinfer does not import ({e}): install flashinfer-python 0.6.x")
        return 1
    if args.prewarm:
        return prewarm(args.prewarm)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "flashinfer": getattr(flashinfer, "__version__", "?"),
        "heads": HEADS,
        "page_size": PAGE,
        "suffix": SUFFIX,
        "copy_GBps": copy_bandwidth_gbps(args.warmup, args.iters),
        "engine_attention": args.engine_attention,
    }
    if not args.skip_attention:
        result["attention"] = bench_attention(args, result["copy_GBps"])
        result["targets"] = targets(result["attention"])
    if not args.skip_engine:
        torch.cuda.empty_cache()
        try:
            result["engine"] = bench_engine(args)
        except Exception as e:  # report the failure, keep part (a)'s numbers
            result["engine_error"] = f"{type(e).__name__}: {e}"
    (args.out / "gpu_attention.json").write_text(json.dumps(result, indent=2))
    print(report(result))
    try:
        plot(result, args.out / "gpu_attention.png")
    except ImportError as e:
        print(f"no plot: {e}")
    print(f"wrote {args.out / 'gpu_attention.json'} and {args.out / 'gpu_attention.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
