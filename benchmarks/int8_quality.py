"""Weight-only int8 against float32 on the embedded model: perplexity of a real text and speed.

Perplexity: windows of `--window` tokens of a real text (an arXiv paper of the Parrot paper's
workload, `../shared/data/workloads/arxiv-march-2023/article_0.txt`; without it, the license
text that ships with Python), each prefilled in one step, every position's next-token
cross-entropy averaged, exp'd. Speed: decode steps at batch 1, 8 and 32 over a 100-token
context (the step alone: the engine loop, sampling and scheduling are the same for all).
Columns, side by side in one run: torch ops (eager), the engine's CPU kernels with float32
weights (the default), the same with int8 weights.
Usage: `python benchmarks/int8_quality.py [--windows 4] [--window 512]`.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from parrot_actors.cuda.layout import BatchLayout, SeqLayout
from parrot_actors.cuda.torch_backend import TorchAttention
from parrot_actors.engines.cpu_kernels import kernel_status, load_kernels
from parrot_actors.engines.llama import LlamaRunner
from parrot_actors.engines.model_loader import load_model

ARTICLE = Path(__file__).resolve().parents[1] / "../shared/data/workloads/arxiv-march-2023"
BLOCK = 16


def text() -> tuple[str, str]:
    """(name, text) of the evaluation text: the arXiv article, else Python's LICENSE."""
    article = ARTICLE / "article_0.txt"
    if article.exists():
        return "arxiv-march-2023/article_0.txt", article.read_text()
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return "Python LICENSE.txt", lic.read_text()


def perplexity(runner: LlamaRunner, ids: list[int], window: int, windows: int) -> float:
    """exp(mean next-token cross-entropy) over `windows` windows of `window` tokens."""
    blocks = (window + BLOCK - 1) // BLOCK
    kv = runner.allocate_kv(blocks, BLOCK)
    table = tuple(range(blocks))
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * window : (w + 1) * window + 1]
        inp, target = chunk[:-1], torch.tensor(chunk[1:])
        layout = BatchLayout(BLOCK, prefills=(SeqLayout(window, window, table),))
        logits = runner.forward(inp, list(range(window)), layout, kv, list(range(window)))
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        count += window
    return math.exp(nll / count)


def decode_rate(runner: LlamaRunner, batch: int, steps: int = 5) -> float:
    """Tokens/s of decode steps at `batch` sequences of 100 tokens of context (best of 2)."""
    ctx = 100
    per = (ctx + BLOCK - 1) // BLOCK
    kv = runner.allocate_kv(batch * per, BLOCK)
    seqs = tuple(SeqLayout(1, ctx, tuple(range(i * per, (i + 1) * per))) for i in range(batch))
    layout = BatchLayout(BLOCK, decodes=seqs)
    args = ([17] * batch, [ctx - 1] * batch, layout, kv, list(range(batch)))
    runner.forward(*args)
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.forward(*args)
        best = min(best, (time.perf_counter() - t0) / steps)
    return batch / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=4, help="windows of the text to score")
    ap.add_argument("--window", type=int, default=512, help="tokens per window")
    args = ap.parse_args()
    if not load_kernels():
        sys.exit(f"the packed kernels are needed: {kernel_status()}")
    loaded = load_model()
    cfg = loaded.config
    cpu = torch.device("cpu")
    heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    head_dim = int(cfg.hidden_size) // heads
    name, body = text()
    ids = loaded.tokenizer.encode(body, add_special_tokens=False)
    need = args.windows * args.window + 1
    if len(ids) < need:
        sys.exit(f"{name} has {len(ids)} tokens, fewer than the {need} asked for")
    variants = {"torch linear (eager)": (False, False), "packed float32": (True, False)}
    variants["packed int8"] = (True, True)
    rows = []
    for label, (kernels, int8) in tqdm(variants.items(), desc="variants"):
        backend = TorchAttention(heads, kv_heads, head_dim, cpu, decode_kernel=kernels)
        runner = LlamaRunner(loaded, cpu, torch.float32, backend, kernels=kernels, int8=int8)
        with torch.inference_mode():
            ppl = perplexity(runner, ids, args.window, args.windows)
            rates = [decode_rate(runner, b) for b in (1, 8, 32)]
        rows.append((label, ppl, rates))
        del runner
    print(
        f"\n{name}: {args.windows} windows x {args.window} tokens; SmolLM2-135M-Instruct; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'weights':<24}{'perplexity':>12}{'decode b1':>12}{'b8':>10}{'b32':>10}  tok/s")
    for label, ppl, rates in rows:
        print(f"{label:<24}{ppl:>12.3f}" + "".join(f"{r:>10.1f}" for r in rates).rjust(32))


if __name__ == "__main__":
    main()
