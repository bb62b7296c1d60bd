"""Cost of grammar-constrained decoding per step: xgrammar against llguidance.

For each library that is installed, with the embedded model's tokenizer and vocabulary
(49152), `--batch` requests constrained by one JSON schema (nested object, enum, integer
bounds, array) walk a valid answer token by token; each step fills every request's token
bitmask (`[batch, ceil(vocab / 32)]` int32) and applies it to `[batch, vocab]` float32 logits
in place. Prints grammar compile time, fill time per request per step and apply time per step
(medians over the answer's tokens, after one warm-up pass). Neither library is a dependency of
the project yet: run it from a scratch venv holding them and transformers, e.g.
`python benchmarks/grammar_mask.py --tokenizer ~/.cache/parrot_actors/SmolLM2-135M-Instruct-v1`.

Sources: xgrammar (`GrammarCompiler`, `GrammarMatcher.fill_next_token_bitmask`,
`apply_token_bitmask_inplace`, xgrammar.mlc.ai/docs); llguidance (`LLMatcher`,
`llguidance.torch`, github.com/guidance-ai/llguidance).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "color": "green",
    "tags": ["math", "poetry", "engines"],
    "address": {"city": "London", "zip": "W1"},
}


def walk(
    ids: list[int],
    batch: int,
    fill: Callable[[int], None],
    apply: Callable[[torch.Tensor], None],
    accept: Callable[[int], None],
) -> tuple[float, float]:
    """Median seconds per step of `fill` (all rows) and `apply` over the answer `ids`."""
    logits = torch.randn(batch, VOCAB)
    fills, applies = [], []
    for token in ids:
        a = time.perf_counter()
        for row in range(batch):
            fill(row)
        b = time.perf_counter()
        apply(logits)
        c = time.perf_counter()
        accept(token)
        fills.append(b - a)
        applies.append(c - b)
    return statistics.median(fills), statistics.median(applies)


def bench_xgrammar(tok: object, ids: list[int], batch: int) -> dict[str, float]:
    """Compile, then two walks (the first warms up); figures of the second."""
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB))
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t
    out = (0.0, 0.0)
    for _ in range(2):
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
        mask = xgr.allocate_token_bitmask(batch, VOCAB)

        def accept(token: int, ms: list = matchers) -> None:
            assert all(m.accept_token(token) for m in ms)

        out = walk(
            ids,
            batch,
            lambda row, ms=matchers, mask=mask: ms[row].fill_next_token_bitmask(mask, row),
            lambda logits, mask=mask: xgr.apply_token_bitmask_inplace(logits, mask),
            accept,
        )
    return {
        "compile_ms": compile_s * 1e3,
        "fill_us": out[0] / batch * 1e6,
        "apply_us": out[1] * 1e6,
    }


def bench_llguidance(tok: object, ids: list[int], batch: int) -> dict[str, float]:
    """Matchers (llguidance compiles lazily, so their creation is the compile), then two
    walks; figures of the second."""
    import llguidance
    import llguidance.hf
    import llguidance.torch as lgt

    ltok = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    out = (0.0, 0.0)
    compile_s = 0.0
    for _ in range(2):
        t = time.perf_counter()
        matchers = [llguidance.LLMatcher(ltok, grammar) for _ in range(batch)]
        compile_s = time.perf_counter() - t
        mask = lgt.allocate_token_bitmask(batch, VOCAB)

        def accept(token: int, ms: list = matchers) -> None:
            assert all(m.consume_token(token) for m in ms)

        out = walk(
            ids,
            batch,
            lambda row, ms=matchers, mask=mask: lgt.fill_next_token_bitmask(ms[row], mask, row),
            lambda logits, mask=mask: lgt.apply_token_bitmask_inplace(logits, mask),
            accept,
        )
    return {
        "compile_ms": compile_s * 1e3,
        "fill_us": out[0] / batch * 1e6,
        "apply_us": out[1] * 1e6,
    }


def main() -> None:
    """Parse flags, run each installed library, print a table."""
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = Path.home() / ".cache/parrot_actors/SmolLM2-135M-Instruct-v1"
    p.add_argument("--tokenizer", default=str(default), help="Hugging Face tokenizer folder")
    p.add_argument("--batch", type=int, default=32, help="requests per step")
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = tok.encode(json.dumps(ANSWER), add_special_tokens=False)
    print(
        f"batch {args.batch}, {len(ids)} answer tokens, vocab {VOCAB}, torch threads "
        f"{torch.get_num_threads()}"
    )
    print("| library | compile (ms) | fill (us / request / step) | apply (us / step) |")
    print("|---|---:|---:|---:|")
    for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        try:
            r = fn(tok, ids, args.batch)
        except ImportError as exc:
            print(f"| {name} | not installed ({exc.name}) | | |")
            continue
        print(f"| {name} | {r['compile_ms']:.1f} | {r['fill_us']:.1f} | {r['apply_us']:.0f} |")


if __name__ == "__main__":
    main()
