"""Graph primitives, objective deduction and task groups on the paper's examples."""

from __future__ import annotations

import pytest

import parrot_actors as pa
from parrot_actors.variables.graph import mark_objective


@pa.semantic_function(max_tokens=32)
def write_code(task: pa.Input, code: pa.Output):
    """You are an expert software engineer.
    Write python code of {{input:task}}.
    Code: {{output:code}}"""


@pa.semantic_function()
def write_test(task: pa.Input, code: pa.Input, test: pa.Output(max_tokens=16)):
    """You are an experienced QA engineer.
    You write test code for {{input:task}}.
    Code: {{input:code}}.
    Your test code: {{output:test}}"""


@pa.semantic_function(max_tokens=8)
def summarize(chunk: pa.Input, summary: pa.Output):
    """Summarize this text. {{chunk}} Summary: {{summary}}"""


@pa.semantic_function(max_tokens=8)
def step(prev: pa.Input, out: pa.Output):
    """Continue: {{prev}} Next: {{out}}"""


def wire(call):
    """Link a bound call into the graph the way the runtime does, without running anything."""
    for v in call.outputs:
        v.producer = call
    for v in call.inputs:
        v.consumers.append(call)


def test_snake_game_primitives():
    task = pa.Variable("a snake game")
    c1, (code,) = write_code.bind(task)
    wire(c1)
    c2, (test,) = write_test.bind(task, code)
    wire(c2)
    assert pa.get_producer(code) is c1 and pa.get_producer(task) is None
    assert pa.get_consumers(task) == [c1, c2] and pa.get_consumers(code) == [c2]
    s1, d1 = pa.prefix_hash(c1)
    s2, d2 = pa.prefix_hash(c2)
    assert s1 != s2 and d1 != d2
    c3, _ = write_code.bind(pa.Variable("tetris"))
    assert pa.prefix_hash(c3)[0] == s1  # same constant text, any app
    assert pa.prefix_hash(c3)[1] != d1  # a different leading variable
    mark_objective(test, pa.LATENCY)
    assert pa.get_perf_objective(c1) == pa.LATENCY == pa.get_perf_objective(c2)
    assert c1.task_group is None


def test_dynamic_prefix_key_follows_the_leading_variable():
    doc = pa.Variable("a long document")

    @pa.semantic_function()
    def ask(d: pa.Input, q, a: pa.Output):
        """{{d}} Question: {{q}} Answer: {{a}}"""

    ca, _ = ask.bind(doc, "who?")
    cb, _ = ask.bind(doc, "when?")
    cc, _ = ask.bind(pa.Variable("another"), "who?")
    assert pa.prefix_hash(ca) == pa.prefix_hash(cb) == (None, pa.prefix_hash(ca)[1])
    assert pa.prefix_hash(cc)[1] != pa.prefix_hash(ca)[1]


def test_map_reduce_task_group_and_objectives():
    from parrot_actors.variables.graph import assign_task_group

    @pa.semantic_function(max_tokens=8)
    def reduce8(
        a: pa.Input,
        b: pa.Input,
        c: pa.Input,
        d: pa.Input,
        e: pa.Input,
        f: pa.Input,
        g: pa.Input,
        h: pa.Input,
        out: pa.Output,
    ):
        """Combine: {{a}} {{b}} {{c}} {{d}} {{e}} {{f}} {{g}} {{h}} Final: {{out}}"""

    maps = []
    for i in range(8):
        call, (s,) = summarize.bind(pa.Variable(f"chunk {i}"))
        wire(call)
        maps.append((call, s))
    red, (final,) = reduce8.bind(*[s for _, s in maps])
    wire(red)
    assign_task_group(red)
    assert {c.task_group for c, _ in maps} == {red.id}
    assert red.task_group is None
    mark_objective(final, pa.LATENCY)
    assert pa.get_perf_objective(red) == pa.LATENCY
    assert all(pa.get_perf_objective(c) == pa.THROUGHPUT for c, _ in maps)
    assert all(c.wanted for c, _ in maps)


def test_chain_of_five_marks_everything_upstream():
    v = pa.Variable("start")
    calls = []
    for _ in range(5):
        call, (v,) = step.bind(v)
        wire(call)
        calls.append(call)
    mark_objective(calls[2].outputs[0], pa.THROUGHPUT)
    assert [c.objective for c in calls] == [pa.THROUGHPUT] * 3 + [None] * 2
    assert [c.wanted for c in calls] == [True] * 3 + [False] * 2
    mark_objective(v, pa.LATENCY)
    assert [c.objective for c in calls] == [pa.LATENCY] * 5
    assert all(c.task_group is None for c in calls)
    assert pa.get_consumers(calls[0].outputs[0]) == [calls[1]]


def test_perf_must_be_known():
    with pytest.raises(pa.TemplateError, match="perf='fast'"):
        from parrot_actors.variables.perf import check_objective

        check_objective("fast")
