"""The paper's two summary apps (Parrot §8.2: map-reduce, Fig. 13; chain, Fig. 11) written as
LangChain's docs write them (LCEL: prompt | model | StrOutputParser), run by `compile_chain`
so each run is one Parrot submission.

    python examples/langchain_summaries.py [--url URL] [--chunks N] [--words N] [--step-by-step]

Without --url it starts an embedded runtime on the embedded model. `--step-by-step` runs the
same chains uncompiled (one request per step, what LangChain does on its own), for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableParallel, RunnablePassthrough

import parrot_actors as pa
from parrot_actors import apps
from parrot_actors.integrations.chains import compile_chain
from parrot_actors.integrations.langchain import ChatParrot

SYSTEM = "You summarize documents."
MAP_USER = "Summarize this part:\n\n{chunk}"
REFINE_USER = "Summary so far:\n{summary}\n\nRefine it with this part:\n\n{chunk}"
MAP = ChatPromptTemplate.from_messages([("system", SYSTEM), ("user", MAP_USER)])
REFINE = ChatPromptTemplate.from_messages([("system", SYSTEM), ("user", REFINE_USER)])


def reduce_user(n: int) -> str:
    """The reduce step's user message over summaries `s0`..`s{n-1}` (a template)."""
    return "Combine these summaries:\n" + "\n".join(f"- {{s{i}}}" for i in range(n))


def map_reduce(llm: BaseChatModel, n: int) -> Runnable[Any, Any]:
    """Summarize chunks `c0`..`c{n-1}` in parallel, then combine the summaries."""
    maps = RunnableParallel(
        {
            f"s{i}": {"chunk": lambda d, i=i: d[f"c{i}"]} | MAP | llm | StrOutputParser()
            for i in range(n)
        }
    )
    reduce = ChatPromptTemplate.from_messages([("system", SYSTEM), ("user", reduce_user(n))])
    return maps | reduce | llm | StrOutputParser()


def chain_summary(llm: BaseChatModel, n: int) -> Runnable[Any, Any]:
    """Refine one running summary chunk by chunk (each step reads the previous summary)."""
    steps: Runnable[Any, Any] = RunnablePassthrough.assign(
        summary={"chunk": lambda d: d["c0"]} | MAP | llm | StrOutputParser()
    )
    for i in range(1, n):
        refine = {"summary": lambda d: d["summary"], "chunk": lambda d, i=i: d[f"c{i}"]}
        steps = steps | RunnablePassthrough.assign(
            summary=refine | REFINE | llm | StrOutputParser()
        )
    return steps | (lambda d: d["summary"])


async def run(llm: ChatParrot, args: argparse.Namespace) -> None:
    """Both apps on one document; prints each summary and its wall time."""
    title, text = apps.demo_document(None)
    chunks = apps.chunk_words(text, args.chunks, args.words)
    inputs = {f"c{i}": c for i, c in enumerate(chunks)}
    print(f"=== {title}: {len(chunks)} chunks ===")
    for name, chain in (
        ("map-reduce", map_reduce(llm, len(chunks))),
        ("chain", chain_summary(llm, len(chunks))),
    ):
        runnable = chain if args.step_by_step else compile_chain(chain)
        start = time.perf_counter()
        out = await runnable.ainvoke(inputs)
        print(f"[{name}, {time.perf_counter() - start:.1f} s] {out.strip()[:300]}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running service (default: an embedded runtime)")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--step-by-step", action="store_true", help="run the chains uncompiled")
    args = parser.parse_args()
    if args.url:
        await run(ChatParrot(url=args.url, temperature=0, max_tokens=args.max_tokens), args)
        return
    async with pa.Runtime(engines=[pa.EngineConfig()]) as rt:
        await run(ChatParrot(runtime=rt, temperature=0, max_tokens=args.max_tokens), args)


if __name__ == "__main__":
    asyncio.run(main())
