"""The paper-shape options of the scenarios (benchmarks/paper_sim.py): whole-article chunks,
the recorded multi-agent replay, equal GPTs mixes, the mixed workload's arrivals, and that every
paper_sim run's flags are the scenarios' own. No engine runs here (all fast)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from parrot_actors.engines.model_loader import load_tokenizer
from scenarios import gpts, mixed, multi_agent, workloads
from scenarios.cli import parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


def _paper_sim():
    spec = importlib.util.spec_from_file_location("paper_sim", ROOT / "benchmarks/paper_sim.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["paper_sim"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_chunks_zero_is_the_whole_text_in_pieces(tokenizer):
    text = workloads.article(3)[:4000]
    pieces = workloads.chunks(tokenizer, text, 0, 100)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(pieces) == -(-len(ids) // 100)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")[: len("".join(pieces))]
    # A fixed count still recycles a short text.
    assert len(workloads.chunks(tokenizer, "a short text", 3, 2)) == 3


def test_recorded_rounds_replay_the_review_revise_pair():
    rounds = workloads.recorded_rounds(10)
    assert len(rounds) == 10
    assert len(rounds[0]) == 1  # the architect
    assert [r[0].prompt for r in rounds[2::2]] == [rounds[2][0].prompt] * 4  # reviewers
    assert [r[0].prompt for r in rounds[3::2]] == [rounds[3][0].prompt] * 4  # revisers
    assert rounds[2][0].prompt != rounds[3][0].prompt
    assert all(q.prompt and q.response for r in rounds for q in r)
    with pytest.raises(ValueError):
        workloads.recorded_rounds(0)


def test_recorded_workload_splits_each_round_at_a_common_prefix(tokenizer):
    ctx = SimpleNamespace(count=lambda t: len(tokenizer.encode(t, add_special_tokens=False)))
    args = SimpleNamespace(recorded_rounds=4, files=3)
    rounds = multi_agent.recorded_workload(ctx, args)
    recorded = workloads.recorded_rounds(4)
    for r, reqs in enumerate(rounds):
        assert len(reqs) == 3
        for b, (key, prefix, rest, n) in enumerate(reqs):
            q = recorded[r][b % len(recorded[r])]
            assert prefix + rest == q.prompt and rest  # nothing lost, something to send
            assert n == ctx.count(q.response) and key.startswith(f"round{r}/")
        assert len({prefix for _, prefix, _, _ in reqs}) == 1
    assert len({k for r in rounds for k, *_ in r}) == 12  # keys unique


def test_gpts_equal_mix_is_balanced_and_seeded():
    classes = workloads.gpts_apps()
    picks = gpts._picks(random.Random(0), classes, 10, "equal")
    assert sorted(picks) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert picks == gpts._picks(random.Random(0), classes, 10, "equal")


def test_mixed_uniform_chats_and_job_offsets(tokenizer):
    args = parser().parse_args(
        ["bench", "mixed", "--chats", "5", "--chat-rate", "2", "--chat-arrivals", "uniform"]
        + ["--chat-lengths", "sharegpt", "--jobs", "3", "--job-offsets", "0,1.5"]
    )
    ctx = SimpleNamespace(tokenizer=tokenizer, seed=0)
    todo = mixed.chats(ctx, args)
    assert [t for _, _, t in todo] == [0.0, 0.5, 1.0, 1.5, 2.0]
    for message, n, _ in todo:
        n_in = len(tokenizer.encode(message, add_special_tokens=False))
        assert 4 <= n_in <= 1024 and n >= 4 and n_in + n <= 2048
    assert mixed.job_offsets(args) == [0.0, 1.5, 0.0]


def test_paper_sim_runs_use_the_scenarios_flags():
    ps = _paper_sim()
    keys = [r.key for r in ps.runs(200)]
    assert {"fig12b", "fig16", "fig17", "fig17_16files", "fig18"} <= set(keys)
    for run in ps.runs(200):
        args = parser().parse_args(["bench", run.scenario, *run.flags, "--rtt", ps.RTT])
        assert args.sim and args.rtt == pytest.approx(0.244)
        assert run.rows and all(r.paper > 0 for r in run.rows)
