"""`compile_chain` (issue 15, second part, embedded runtime): LCEL graphs over `ChatParrot`
submitted whole; outputs token for token those of the same chain run step by step."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

import parrot_actors as pa
from parrot_actors.errors import InvalidRequestError, TemplateError
from parrot_actors.integrations.chains import compile_chain
from parrot_actors.integrations.langchain import ChatParrot
from parrot_actors.server import BackgroundServer
from tests.conftest import load_example, tiny_config

CHUNKS = [f"Part {i}: the engine batches requests number {i * 7}." for i in range(6)]


def three_step(llm: ChatParrot):
    """Outline -> draft -> title, each step reading the previous one's text."""
    outline = ChatPromptTemplate.from_messages(
        [("system", "You plan essays."), ("user", "Outline an essay on {topic}.")]
    )
    draft = ChatPromptTemplate.from_messages(
        [("system", "You write essays."), ("user", "Write from this outline: {outline}")]
    )
    title = PromptTemplate.from_template("A title for: {draft}")
    return (
        {"outline": outline | llm | StrOutputParser()}
        | RunnablePassthrough.assign(draft=draft | llm | StrOutputParser())
        | title
        | llm
        | StrOutputParser()
    )


def map_reduce(llm: ChatParrot):
    """Six one-chunk summaries in parallel (inputs `c0`..`c5`), then one reduce over them."""
    maps = RunnableParallel(
        {
            f"s{i}": PromptTemplate.from_template(f"{{c{i}}}") | llm | StrOutputParser()
            for i in range(6)
        }
    )
    reduce = ChatPromptTemplate.from_template(
        "Combine:\n" + "\n".join(f"- {{s{i}}}" for i in range(6))
    )
    return maps | reduce | llm | StrOutputParser()


async def test_compiled_chains_equal_step_by_step_and_are_submitted_whole():
    async with pa.Runtime(engines=[tiny_config(kv_cache_bytes=64 << 20)]) as rt:
        llm = ChatParrot(runtime=rt, temperature=0, max_tokens=10)
        chain = three_step(llm)
        expected = await chain.ainvoke({"topic": "actors"})
        submitted = []
        real_submit = rt.submit

        def spy(call):
            # Every input of a call submitted so far: none may be known yet when the whole
            # graph goes in at once.
            submitted.append([p.variable.done() for p in call.pieces if p.kind == "input"])
            real_submit(call)

        rt.submit = spy
        got = await compile_chain(chain).ainvoke({"topic": "actors"})
        rt.submit = real_submit
        assert got == expected
        assert submitted == [[], [False], [False]]
        # abatch: two runs at once, each equal to its step-by-step output.
        topics = [{"topic": "actors"}, {"topic": "caches"}]
        assert await compile_chain(chain).abatch(topics) == await chain.abatch(topics)


async def test_map_reduce_and_a_lambda_boundary():
    async with pa.Runtime(engines=[tiny_config(kv_cache_bytes=64 << 20)]) as rt:
        llm = ChatParrot(runtime=rt, temperature=0, max_tokens=8)
        summarize = ChatPromptTemplate.from_messages(
            [("system", "Summarize in one sentence."), ("user", "{chunk}")]
        )
        chain = map_reduce(llm)
        inputs = {f"c{i}": c for i, c in enumerate(CHUNKS)}
        assert await compile_chain(chain).ainvoke(inputs) == await chain.ainvoke(inputs)
        # A Python step in the middle runs here, between two compiled graphs.
        shout = RunnableLambda(lambda text: {"chunk": text.upper()}, name="shout")
        bounded = (
            PromptTemplate.from_template("{c0}") | llm | StrOutputParser() | shout | summarize | llm
        )
        got = await compile_chain(bounded).ainvoke(inputs)
        want = await bounded.ainvoke(inputs)
        assert got.content == want.content
        with pytest.raises(TemplateError, match="cannot compile step 'shout'"):
            await compile_chain(bounded, strict=True).ainvoke(inputs)
    with pytest.raises(InvalidRequestError, match="no ChatParrot step"):
        compile_chain(StrOutputParser())


def _requests(url: str) -> dict[tuple[str, str], float]:
    """Requests answered so far, by (method, route), from the service's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for m in re.finditer(
        r'parrot_http_requests_total\{method="(\w+)",route="([^"]+)",status="\d+"\} (\S+)', text
    ):
        key = (m.group(1), m.group(2))
        out[key] = out.get(key, 0) + float(m.group(3))
    return out


def test_remote_chains_one_submission_batch_and_one_wait():
    with BackgroundServer([tiny_config(kv_cache_bytes=64 << 20)]) as server:
        llm = ChatParrot(url=server.url, temperature=0, max_tokens=8)
        chain = map_reduce(llm)
        inputs = {f"c{i}": c for i, c in enumerate(CHUNKS)}
        expected = chain.invoke(inputs)  # step by step: 7 chat completions
        before = _requests(server.url)
        assert compile_chain(chain).invoke(inputs) == expected
        deadline = time.monotonic() + 10
        while _requests(server.url).get(("DELETE", "/v1/session"), 0) == before.get(
            ("DELETE", "/v1/session"), 0
        ):  # the session ends after the answer came back
            assert time.monotonic() < deadline, "the run's session was never ended"
            time.sleep(0.01)
        after = _requests(server.url)
        sent = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        # One session, one render of all 7 prompts, one batch of the 7 calls, one wait sent
        # beside the batch, the session's end.
        assert {k: v for k, v in sent.items() if k[1] != "/metrics"} == {
            ("POST", "/v1/sessions"): 1,
            ("POST", "/v1/parrot/render_chat"): 1,
            ("POST", "/v1/calls/batch"): 1,
            ("GET", "/v1/variables/{id}"): 1,
            ("DELETE", "/v1/session"): 1,
        }


async def test_the_example_apps_routing_lambdas_compile_without_waiting():
    example = load_example("langchain_summaries")
    async with pa.Runtime(engines=[tiny_config(kv_cache_bytes=64 << 20)]) as rt:
        llm = ChatParrot(runtime=rt, temperature=0, max_tokens=8)
        inputs = {f"c{i}": c for i, c in enumerate(CHUNKS[:4])}
        for chain, calls in ((example.map_reduce(llm, 4), 5), (example.chain_summary(llm, 4), 4)):
            expected = await chain.ainvoke(inputs)
            known = []
            real_submit = rt.submit
            rt.submit = lambda call, known=known, real_submit=real_submit: (
                known.append(any(p.variable.done() for p in call.pieces if p.kind == "input")),
                real_submit(call),
            )
            try:
                assert await compile_chain(chain, strict=True).ainvoke(inputs) == expected
            finally:
                rt.submit = real_submit
            assert known == [False] * calls  # every call went in before any answer existed
