"""The agentic trace generator (a pure, seeded function: its shape, exact prefix shares, the
JSONL format) and the replay in simulated time (both modes, the same text, the trace's
shape recorded)."""

from __future__ import annotations

import pytest

from scenarios.agent_trace import (
    TraceParams,
    TraceSession,
    TraceTurn,
    describe,
    generate,
    prefix_shares,
    read_trace,
    write_trace,
)

SUB = TraceSession(id="a/sub-0", turns=(TraceTurn(0.0, 50, 40),))
ROOT = TraceSession(
    id="a",
    start_s=1.5,
    turns=(TraceTurn(0.0, 100, 20), TraceTurn(0.0, 0, 10), TraceTurn(2.0, 30, 10)),
    spawn_after=0,
    children=(SUB, SUB),
)


def test_prefix_shares_exact_with_sub_agent_reports():
    # Turn 1 reads two reports of 40 tokens: (1000 + 100 + 20) / (1120 + 80); turn 2 appends
    # a 30-token tool result: (1200 + 10) / (1210 + 30).
    assert prefix_shares(ROOT, 1000) == [1120 / 1200, 1210 / 1240]
    assert prefix_shares(SUB, 1000) == []
    shape = describe([ROOT], 1000)
    assert shape["roots"] == 1 and shape["sub_agents"] == 2 and shape["turns_median"] == 3
    assert shape["prefix_share_min"] == 1120 / 1200 and shape["prefix_share_over_90"] == 1.0
    assert shape["gap_min_s"] == shape["gap_max_s"] == 2.0
    assert shape["longest_prompt_tokens"] == 1000 + 100 + 20 + 10 + 30 + 10
    assert shape["with_sub_agents"] == 1.0


def test_default_trace_has_the_shape_of_agent_traffic():
    p = TraceParams(sessions=200)
    roots = generate(p, seed=0)
    assert generate(p, seed=0) == roots and generate(p, seed=1) != roots
    shape = describe(roots, p.system_tokens)
    assert 35 <= shape["turns_median"] <= 45  # lognormal, median 40
    assert shape["prefix_share_over_90"] > 0.9  # each turn is mostly the previous one
    assert 0.5 <= shape["gap_min_s"] and shape["gap_max_s"] <= 30.0
    assert 0.2 <= shape["with_sub_agents"] <= 0.4  # 30% of roots
    assert shape["longest_prompt_tokens"] <= p.max_context_tokens
    starts = [r.start_s for r in roots]
    assert starts == sorted(starts) and starts[0] > 0  # Poisson arrivals
    for r in roots:
        if r.children:  # the turn after the spawn reads the reports: no tool call, no result
            t = r.turns[r.spawn_after + 1]
            assert (t.gap_s, t.new_tokens) == (0.0, 0)
            assert all(2 <= len(c.turns) for c in r.children)
        assert 1 <= len(r.turns) <= p.turns_range[1]


def test_generate_rejects_a_bad_range():
    with pytest.raises(ValueError, match=r"tool_gap_s=\(5.0, 1.0\)"):
        generate(TraceParams(tool_gap_s=(5.0, 1.0)), seed=0)


def test_trace_file_round_trip_and_a_bad_line_named(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(path, [ROOT, ROOT])
    assert read_trace(path) == [ROOT, ROOT]
    assert '"turns":[[0.0,100,20],' in path.read_text().splitlines()[0]
    path.write_text(path.read_text() + '{"id": "b", "turns": [[1, "x", 2]]}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:3: not a trace session"):
        read_trace(path)


def _sim(out, *extra: str):
    from scenarios import load
    from scenarios.cli import bench, parser

    argv = ["bench", "agent_trace", "--sim", "a100", "--sim-model", "llama-3-8b", "--rtt", "0.1"]
    argv += ["--no-progress", "--out", str(out), *load("agent_trace").SMALLEST, *extra]
    return bench(parser().parse_args(argv), argv)[0]


def test_replay_in_simulated_time_from_the_generator_and_from_its_file(tmp_path):
    from parrot_actors.engines.step_time import locate_profiles
    from parrot_actors.errors import InvalidRequestError
    from scenarios.metrics import compare_outputs

    try:
        locate_profiles()
    except InvalidRequestError:
        pytest.skip("no GPU profiles (../shared/data/gpu_profiles)")
    trace = tmp_path / "trace.jsonl"
    generated = _sim(tmp_path / "a", "--trace-out", str(trace))
    replayed = _sim(tmp_path / "b", "--trace", str(trace), "--sessions", "1")
    assert [r.label for r in generated] == ["parrot", "baseline"]
    assert compare_outputs(generated)[1] == [] and len(generated[0].outputs) == 14
    for a, b in zip(generated, replayed):  # the file replays the same sessions, same times
        assert a.outputs == b.outputs and a.tokens == b.tokens
        assert [(x.app, x.kind, x.e2e_s) for x in a.apps] == [
            (x.app, x.kind, x.e2e_s) for x in b.apps
        ]
        assert a.round_trips == 14 and a.extra["trace_sub_agents"] == 4.0
        kinds = sorted(x.kind for x in a.apps)
        assert kinds == ["session"] * 2 + ["sub-agent"] * 4


def test_a_turn_without_retained_context_reuses_the_cache_like_the_baseline(tmp_path):
    # Regression: Parrot forked the shared system prompt at a point inside a KV block, and
    # automatic prefix caching cannot continue after a private partial block, so every turn
    # whose retained context was gone (here: none kept) recomputed the whole conversation.
    from parrot_actors.engines.step_time import locate_profiles
    from parrot_actors.errors import InvalidRequestError
    from scenarios.cli import bench, parser

    try:
        locate_profiles()
    except InvalidRequestError:
        pytest.skip("no GPU profiles (../shared/data/gpu_profiles)")
    argv = ["bench", "agent_trace", "--sim", "a100", "--sim-model", "llama-3-8b", "--rtt", "0.1"]
    argv += ["--sessions", "2", "--session-rate", "0.5", "--turns-median", "3"]
    argv += ["--turns-range", "3", "3", "--tool-gap", "0.5", "1", "--subagent-share", "0"]
    argv += ["--retain-s", "0", "--no-progress", "--out", str(tmp_path)]
    parrot, baseline = bench(parser().parse_args(argv), argv)[0]
    assert parrot.tokens.generated_tokens == baseline.tokens.generated_tokens > 0
    assert parrot.tokens.prefill_tokens == baseline.tokens.prefill_tokens
