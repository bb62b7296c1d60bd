"""Prefix sharing in the runtime: static and dynamic prefixes forked, freed when unneeded."""

from __future__ import annotations

import asyncio

import pytest

import parrot_actors as pa
from parrot_actors.engines import Engine, EngineConfig
from parrot_actors.engines.echo import EchoEngine


@pa.semantic_function(max_tokens=20)
def ask_doc(doc: pa.Input, question, answer: pa.Output):
    """{{doc}}
    Question: {{question}} Answer: {{answer}}"""


async def test_dynamic_prefix_shared_and_freed_on_echo():
    engine = EchoEngine()
    async with pa.Runtime(engines=[engine]) as rt:
        doc = pa.Variable("A long shared document about parrots. " * 3)
        answers = [ask_doc(doc, q) for q in ("who?", "what?", "why?")]
        await pa.gather(*answers)
        prefix_fills = [e for e in engine.log if e[0] == "fill" and e[1].startswith("prefix")]
        assert len(prefix_fills) == 1  # one prefix context, filled once
        assert engine.stats().reused_tokens == 3 * len(prefix_fills[0][2])
        await asyncio.sleep(0.01)
        assert engine.contexts == {}  # no pending call needs it: freed
        assert rt.scheduler.prefixes.entries == {}
    # Unshared, the same calls produce the same answers.
    plain = EchoEngine()
    async with pa.Runtime(engines=[plain], scheduler=pa.SchedulerConfig(prefix_sharing=False)):
        again = [ask_doc(doc, q) for q in ("who?", "what?", "why?")]
        assert await pa.gather(*again) == [a.value() for a in answers]
        assert not any(e[1].startswith("prefix") for e in plain.log)


def long_system_prompt(tokenizer, n: int) -> str:
    rules = " ".join(
        f"Rule {i}: always answer question {i} politely and with care." for i in range(300)
    )
    ids = tokenizer.encode(rules, add_special_tokens=False)[:n]
    return tokenizer.decode(ids)


def make_assistant(system: str) -> pa.variables.SemanticFunction:
    def assistant(question: pa.Input, answer: pa.Output):
        """set below"""

    assistant.__doc__ = system + "\nUser: {{question}}\nAssistant: {{answer}}"
    return pa.semantic_function(max_tokens=12)(assistant)


QUESTIONS = [f"What is rule number {i}?" for i in (3, 17, 42, 8, 99, 5, 61, 250)]


@pytest.mark.real_model
async def test_shared_system_prompt_prefilled_once(real_engine: Engine):
    system = long_system_prompt(real_engine.tokenizer, 1000)
    fn = make_assistant(system)
    before = real_engine.stats()
    async with pa.Runtime(engines=[real_engine]) as rt:
        answers = await pa.gather(*[fn(pa.Variable(q)) for q in QUESTIONS])
        await real_engine.flush()
        after = real_engine.stats()
        entries = list(rt.scheduler.prefixes.entries.values())
        assert len(entries) == 1 and entries[0].static
        bs = after.block_size
        # The static prefix cache alone holds blocks now.
        assert after.kv_blocks_used == -(-len(entries[0].tokens) // bs)
    reused = after.reused_tokens - before.reused_tokens
    computed = after.prefill_tokens - before.prefill_tokens
    assert reused >= 7 * 1000 - 8 * bs
    assert computed < 1000 + 8 * 40  # the system prompt once, then only the questions
    assert real_engine.stats().kv_blocks_used == 0  # the runtime freed it on exit
    baseline = pa.SchedulerConfig(policy="fcfs", prefix_sharing=False)
    async with pa.Runtime(engines=[real_engine], scheduler=baseline):
        unshared = await pa.gather(*[fn(pa.Variable(q)) for q in QUESTIONS])
    assert unshared == answers


@pa.semantic_function(max_tokens=24, ignore_eos=True)
def summarize(chunk: pa.Input, summary: pa.Output):
    """Summarize: {{chunk}}
    Summary: {{summary}}"""


@pa.semantic_function(max_tokens=8, ignore_eos=True)
def chat(message: pa.Input, reply: pa.Output):
    """User: {{message}}
    Assistant: {{reply}}"""


async def run_mixed(policy: str) -> tuple[list[tuple[str, int, str]], int, list[int]]:
    from parrot_actors.apps import make_reduce

    # Twice as many maps as the engine runs at once: some wait while the first ones decode.
    engine = await Engine.start(EngineConfig(name=f"mixed-{policy}", max_running=4))
    try:
        cfg = pa.SchedulerConfig(policy=policy, prefix_sharing=policy == "app")
        async with pa.Runtime(engines=[engine], scheduler=cfg) as rt:
            maps = [
                summarize(pa.Variable(f"Section {i} explains topic {i} in depth."))
                for i in range(8)
            ]
            final = make_reduce(8, max_tokens=4)(*maps)
            reduce_task = asyncio.ensure_future(final.get(perf=pa.LATENCY))
            while sum(e[0] == "dispatch" for e in rt.scheduler.event_log) < 8:
                await asyncio.sleep(0.01)
            while engine.stats().generated_tokens < 8:  # the map stage is decoding
                await asyncio.sleep(0.01)
            reply = chat(pa.Variable("Hi! How are you?"))
            await reply.get(perf=pa.LATENCY)
            await reduce_task
            return (rt.scheduler.event_log, reply.producer.id, [m.producer.id for m in maps])
    finally:
        await engine.close()


@pytest.mark.real_model
async def test_latency_call_beats_running_map_stage():
    log, chat_id, map_ids = await run_mixed("app")
    resolved = [e[1] for e in log if e[0] == "resolved"]
    assert resolved.index(chat_id) < max(resolved.index(m) for m in map_ids)
    # The request-level baseline serves it first come, first served: after every map call.
    log, chat_id, map_ids = await run_mixed("fcfs")
    resolved = [e[1] for e in log if e[0] == "resolved"]
    assert resolved.index(chat_id) > max(resolved.index(m) for m in map_ids)
