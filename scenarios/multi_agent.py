"""Multi-agent coding (Parrot §8.4, Fig. 17): architect -> N programmers -> reviewer -> N
revisers, MetaGPT-style, with the role prompts of workloads/metagpt/.

Every agent reads the project design of the recorded run (real text, `--design-tokens` of it)
first, then its role; programmers also read the architect's answer, the reviewer and revisers
the whole codebase. Parrot submits the whole workflow at once: the N programmers (and the N
revisers) share one forked prefix, and the design's KV is cached across roles. The baseline
sends one request at a time (`--baseline-stages sequential`, the request-level app) or each
stage's N requests at once (`concurrent`), and by default runs on the latency-tuned engine.

`--recorded-rounds R` replays the recorded run instead, the paper's way (Fig. 17, the artifact's
`bench_multi_agents_vllm.py` / `bench_hack_parrot.py`): R rounds (the architect, the programmers,
then the reviewers and revisers repeated: 10 rounds at the paper's setting), each of `--files`
requests sent together, every request the recorded prompt of its file (files cycle when there
are more than recorded; the architect's one prompt is sent `--files` times, as there), with the
recorded answer's length in tokens as its output length. A round starts when the last one's
answers are back: one round trip per round in both modes. Parrot shares each round's common
prompt prefix (a static prefix every request of the round forks).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re

import parrot_actors as pa
from scenarios import workloads
from scenarios.context import RunContext
from scenarios.functions import make_function, max_tokens_of, render

NAME = "multi_agent"
FIGURE = "Fig. 17"
SMALLEST = [
    "--files",
    "2",
    "--design-tokens",
    "48",
    "--architect-tokens",
    "4",
    "--code-tokens",
    "4",
    "--review-tokens",
    "4",
]
"""Flags of the smallest size (CI)."""
BASELINE_TUNINGS = ["latency"]
TASK = "Write a deep learning framework like PyTorch."


def add_args(p: argparse.ArgumentParser) -> None:
    """Scenario flags (sizes in tokens)."""
    p.add_argument("--files", type=int, default=8, help="files (programmers and revisers)")
    p.add_argument("--design-tokens", type=int, default=1500, help="project design tokens")
    p.add_argument("--architect-tokens", type=int, default=24, help="architect answer tokens")
    p.add_argument("--code-tokens", type=int, default=24, help="tokens per file of code")
    p.add_argument("--review-tokens", type=int, default=24, help="review comment tokens")
    p.add_argument(
        "--recorded-rounds",
        type=int,
        default=0,
        help="replay this many rounds of the recorded run (0: the workflow above; paper: 10)",
    )
    p.add_argument(
        "--baseline-stages",
        choices=["sequential", "concurrent"],
        default="sequential",
        help="how the baseline app sends a stage's N requests",
    )


def num_apps(args: argparse.Namespace) -> int:
    """Apps the progress bar counts: one workflow."""
    return 1


def intro(role: str) -> str:
    """The role's opening paragraphs (up to its first placeholder), without the example task
    of the original prompt."""
    keep = []
    for para in workloads.role_prompt(role).split("\n\n"):
        if "{" in para:
            break
        if not para.startswith("Task: Write") and para.strip() != "Codebase:":
            keep.append(para.strip())
    return "\n\n".join(keep)


def instruction(role: str, file: str, others: list[str]) -> str:
    """The role prompt's per-file instruction for `file` (its paragraph naming the file, with
    the other files filled in); a built-in sentence when the prompt has none."""
    for para in workloads.role_prompt(role).split("\n\n"):
        if "{file_name}" in para:
            text = re.sub(
                r"\{other_filename\d\}(?:(?:, | and )\{other_filename\d\})*",
                ", ".join(others),
                para,
            )
            text = text.replace("game.py and snake.py", ", ".join(others))
            return text.replace("{file_name}", file).strip()
    return f"You only need to implement {file}. Do not write any other file."


def file_names(n: int) -> list[str]:
    """`n` file names: the recorded run's, then numbered ones."""
    names = workloads.recorded_files()
    return (names + [f"module{i}.py" for i in range(len(names), n)])[:n]


def functions(args: argparse.Namespace, files: list[str]) -> dict[str, object]:
    """The four roles' semantic functions. Each prompt starts with the design (a plain
    parameter, so constant text), which is why its KV can be shared across roles."""
    head = "Project design:\n{{design}}\n\n"
    code = "".join(f"\n\n{f}:\n{{{{c{i}}}}}" for i, f in enumerate(files))
    cs = [f"c{i}" for i in range(len(files))]
    return {
        "architect": make_function(
            "architect",
            head + "{{intro}}\n\nTask: {{task}}\nList the files and the API of each.\n"
            "Answer: {{out}}",
            [],
            ["design", "intro", "task"],
            args.architect_tokens,
        ),
        "programmer": make_function(
            "programmer",
            head + "{{intro}}\n\nAPIs:\n{{apis}}\n\n{{instruction}}\nCode: {{out}}",
            ["apis"],
            ["design", "intro", "instruction"],
            args.code_tokens,
        ),
        "reviewer": make_function(
            "reviewer",
            head + "{{intro}}\n\nCodebase:" + code + "\n\nComments: {{out}}",
            cs,
            ["design", "intro"],
            args.review_tokens,
        ),
        "reviser": make_function(
            "reviser",
            head + "Codebase:" + code + "\n\nReview comments:\n{{review}}\n\n"
            "{{instruction}}\nRevised code: {{out}}",
            [*cs, "review"],
            ["design", "instruction"],
            args.code_tokens,
        ),
    }


def _setup(ctx: RunContext, args: argparse.Namespace) -> tuple[list[str], dict, dict]:
    files = file_names(args.files)
    design = workloads.fit(ctx.tokenizer, workloads.recorded_design(), args.design_tokens)
    texts = {
        "design": design,
        "architect": intro("architect"),
        "programmer": intro("programmer"),
        "reviewer": intro("reviewer"),
    }
    return files, functions(args, files), texts


def _others(files: list[str], f: str) -> list[str]:
    return [x for x in files if x != f]


def _split_common(prompts: list[str]) -> tuple[str, list[str]]:
    """(common prefix, the rest of each prompt): the prefix ends at the last space or newline
    before the prompts first differ, and leaves each rest at least one character."""
    first = prompts[0]
    i = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
    cut = max(first.rfind(" ", 0, i), first.rfind("\n", 0, i))
    cut = max(cut, 0)
    return first[:cut], [p[cut:] for p in prompts]


def recorded_workload(ctx: RunContext, args: argparse.Namespace) -> list[list[tuple]]:
    """Per round, per request: (output key, common prefix, rest of the prompt, output
    tokens)."""
    out = []
    for r, queries in enumerate(workloads.recorded_rounds(args.recorded_rounds)):
        picks = [queries[b % len(queries)] for b in range(args.files)]
        prefix, rests = _split_common([q.prompt for q in picks])
        out.append(
            [
                (f"round{r}/{q.key}/{b}", prefix, rest, max(1, ctx.count(q.response)))
                for b, (q, rest) in enumerate(zip(picks, rests))
            ]
        )
    return out


def _recorded_function(r: int, tokens: int) -> object:
    return make_function(f"round{r}", "{{prefix}}{{rest}}{{out}}", ["rest"], ["prefix"], tokens)


async def _run_recorded(ctx: RunContext, args: argparse.Namespace) -> None:
    rounds = recorded_workload(ctx, args)
    arrival = ctx.now()
    finals: list[str] = []
    calls = 0
    for r, reqs in enumerate(rounds):
        fns = [_recorded_function(r, n) for _, _, _, n in reqs]
        if ctx.parrot:
            outs = [fn(prefix=p, rest=pa.Variable(rest)) for fn, (_, p, rest, _) in zip(fns, reqs)]
            texts = await pa.gather(*outs, perf=pa.LATENCY)
            await ctx.network()
        else:
            texts = await asyncio.gather(
                *(
                    ctx.complete(render(fn, prefix=p, rest=rest), n, f"round{r}", 0)
                    for fn, (_, p, rest, n) in zip(fns, reqs)
                )
            )
        for (key, *_), text in zip(reqs, texts):
            ctx.keep(key, text)
        finals, calls = list(texts), calls + len(reqs)
    ctx.finish(0, "workflow", arrival, finals, calls)


async def run_parrot(ctx: RunContext, args: argparse.Namespace) -> None:
    """Parrot: the whole workflow submitted at once; one round trip."""
    if args.recorded_rounds > 0:
        return await _run_recorded(ctx, args)
    files, fn, t = _setup(ctx, args)
    d = t["design"]
    arrival = ctx.now()
    apis = fn["architect"](design=d, intro=t["architect"], task=TASK)
    codes = [
        fn["programmer"](
            apis=apis,
            design=d,
            intro=t["programmer"],
            instruction=instruction("programmer", f, _others(files, f)),
        )
        for f in files
    ]
    cv = {f"c{i}": c for i, c in enumerate(codes)}
    review = fn["reviewer"](design=d, intro=t["reviewer"], **cv)
    revised = [
        fn["reviser"](
            design=d, review=review, instruction=instruction("reviser", f, _others(files, f)), **cv
        )
        for f in files
    ]
    finals = await pa.gather(*revised, perf=pa.LATENCY)
    await ctx.network()
    ctx.keep("architect", apis.value())
    for i, f in enumerate(files):
        ctx.keep(f"programmer/{f}", codes[i].value())
        ctx.keep(f"reviser/{f}", finals[i])
    ctx.keep("reviewer", review.value())
    ctx.finish(0, "workflow", arrival, finals, 2 + 2 * len(files))


async def _stage(ctx: RunContext, prompts: list[str], mt: int, name: str, concurrent: bool) -> list:
    if concurrent:
        return list(await asyncio.gather(*(ctx.complete(p, mt, name, 0) for p in prompts)))
    return [await ctx.complete(p, mt, name, 0) for p in prompts]


async def run_baseline(ctx: RunContext, args: argparse.Namespace) -> None:
    """Baseline: request by request (each stage sequential or concurrent)."""
    if args.recorded_rounds > 0:
        return await _run_recorded(ctx, args)
    files, fn, t = _setup(ctx, args)
    d = t["design"]
    conc = args.baseline_stages == "concurrent"
    arrival = ctx.now()
    a = fn["architect"]
    apis = await ctx.complete(
        render(a, design=d, intro=t["architect"], task=TASK), max_tokens_of(a), "architect", 0
    )
    p = fn["programmer"]
    prompts = [
        render(
            p,
            apis=apis,
            design=d,
            intro=t["programmer"],
            instruction=instruction("programmer", f, _others(files, f)),
        )
        for f in files
    ]
    codes = await _stage(ctx, prompts, max_tokens_of(p), "programmer", conc)
    cv = {f"c{i}": c for i, c in enumerate(codes)}
    r = fn["reviewer"]
    review = await ctx.complete(
        render(r, design=d, intro=t["reviewer"], **cv), max_tokens_of(r), "reviewer", 0
    )
    v = fn["reviser"]
    prompts = [
        render(
            v,
            design=d,
            review=review,
            instruction=instruction("reviser", f, _others(files, f)),
            **cv,
        )
        for f in files
    ]
    finals = await _stage(ctx, prompts, max_tokens_of(v), "reviser", conc)
    ctx.keep("architect", apis)
    for i, f in enumerate(files):
        ctx.keep(f"programmer/{f}", codes[i])
        ctx.keep(f"reviser/{f}", finals[i])
    ctx.keep("reviewer", review)
    ctx.finish(0, "workflow", arrival, finals, 2 + 2 * len(files))
