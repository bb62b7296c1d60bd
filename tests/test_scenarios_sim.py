"""Scenarios in simulated time (CI's GPU-scale check): the chain and map-reduce workloads on a
simulated A100 with Llama-2-7B, both modes, run twice: the same tokens in both modes, the same
timings in both runs, and Parrot's saved round trips visible in the simulated times."""

from __future__ import annotations

import pytest

from parrot_actors.engines.step_time import locate_profiles
from parrot_actors.errors import InvalidRequestError
from scenarios import load
from scenarios.cli import bench, parser
from scenarios.metrics import compare_outputs

try:
    locate_profiles()
except InvalidRequestError:
    pytest.skip("no GPU profiles (../shared/data/gpu_profiles)", allow_module_level=True)

RTT = 0.25


def run_sim(name: str, out, *extra: str):
    argv = ["bench", name, "--sim", "a100", "--sim-model", "llama-2-7b", "--rtt", str(RTT)]
    argv += ["--no-progress", "--out", str(out), *load(name).SMALLEST, *extra]
    return bench(parser().parse_args(argv), argv)


@pytest.mark.parametrize("name", ["chain_summary", "map_reduce_summary"])
def test_simulated_scenarios_are_deterministic_and_modes_agree(name, tmp_path):
    first, _ = run_sim(name, tmp_path / "a")
    second, _ = run_sim(name, tmp_path / "b")
    assert [r.label for r in first] == ["parrot", "baseline"]
    compared, differ = compare_outputs(first)
    assert compared == len(first[0].outputs) > 0 and differ == []
    for a, b in zip(first, second):
        assert a.outputs == b.outputs
        assert [(x.app, x.e2e_s) for x in a.apps] == [(x.app, x.e2e_s) for x in b.apps]
        assert a.tokens == b.tokens
        assert a.extra["host_charged"] == 0.0 and a.extra["host_busy_s"] > 0
    parrot, baseline = first
    main = [a for a in parrot.apps if a.kind != "background"]
    base = [a for a in baseline.apps if a.kind != "background"]
    # The baseline's app waits for one answer before sending the next request (the chain's
    # second step, the reduce after the maps): one round trip more than Parrot's, in
    # simulated seconds, plus whatever the engine steps add.
    assert len(main) == len(base) == 1
    assert base[0].e2e_s - main[0].e2e_s >= RTT
