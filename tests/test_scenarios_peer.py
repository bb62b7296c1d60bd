"""`--baseline-url`: the baseline mode drives another OpenAI-compatible server the
request-level way. Tested against a second server of ours (no foreign server here), and the
counters of vLLM's and SGLang's /metrics parsed from their documented names."""

from __future__ import annotations

import pytest

import parrot_actors as pa
from parrot_actors.server import BackgroundServer, ServerConfig
from scenarios import load
from scenarios.cli import bench, parser
from scenarios.harness import engine_configs
from scenarios.peer import parse_counters, server_name
from scenarios.records import TokenStats

VLLM_METRICS = """\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1200.0
vllm:prompt_tokens_total{engine="1",model_name="m"} 300.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 90.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 512.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 2.0
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="m"} 40.0
vllm:iteration_tokens_total_bucket{engine="0",le="+Inf",model_name="m"} 47.0
vllm:iteration_tokens_total_count{engine="0",model_name="m"} 47.0
vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 1590.0
"""

SGLANG_METRICS = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m"} 700.0
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="m"} 64.0
# HELP sglang:cached_tokens_total The number of prefix cache tokens.
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{model_name="m"} 100.0
"""


def test_vllm_counters_split_prompt_into_computed_and_cached():
    assert parse_counters(VLLM_METRICS) == TokenStats(
        prefill_tokens=988,
        reused_tokens=512,
        generated_tokens=90,
        steps=47,
        preemptions=2,
        source="vllm",
    )


def test_sglang_counters_and_a_server_without_known_ones():
    assert parse_counters(SGLANG_METRICS) == TokenStats(
        prefill_tokens=600, reused_tokens=100, generated_tokens=64, source="sglang"
    )
    other = "# TYPE http_requests_total counter\nhttp_requests_total 5.0\n"
    assert parse_counters(other) == TokenStats(source="n/a")


def test_server_name_from_version_route_or_model_owner():
    assert server_name({"version": "0.11.0"}, "vllm") == {"name": "vllm", "version": "0.11.0"}
    ours = {"version": "0.1.0", "server": "parrot_actors"}
    assert server_name(ours, "parrot_actors") == {"name": "parrot_actors", "version": "0.1.0"}
    assert server_name(None, "") == {"name": "unknown", "version": "unknown"}


def _argv(name: str, out: str, *extra: str) -> list[str]:
    argv = ["bench", name, "--tiny", "--rtt", "0", "--kv-cache-mb", "64", "--no-progress"]
    return [*argv, "--out", out, *load(name).SMALLEST, *extra]


@pytest.mark.parametrize("name", ["map_reduce_summary", "agent_sessions", "langchain_apps"])
def test_baseline_url_drives_another_server_request_level(name, tmp_path, capsys):
    argv = _argv(name, str(tmp_path))
    args = parser().parse_args(argv)
    # The other server: our own request-level configuration, the same tiny model and sizes.
    base = pa.SchedulerConfig(policy="fcfs", prefix_sharing=False)
    with BackgroundServer(engine_configs(args), ServerConfig(port=0), base) as other:
        argv += ["--baseline-url", other.url + "/", "--baseline-model", "engine0"]
        results, body = bench(parser().parse_args(argv), argv)
        routes = other.runtime.call_stats()
        url = other.url
    # langchain_apps: its Parrot clients and one ChatOpenAI client (the latency-tuned one is ours).
    labels = {"langchain_apps": ["chatopenai", "chatparrot", "compiled", "handwritten"]}
    assert [r.label for r in results] == labels.get(name, ["parrot", "baseline"])
    parrot, baseline = (results[-1], results[0]) if name == "langchain_apps" else results
    assert baseline.server["name"] == "parrot_actors" and baseline.server["url"] == url
    assert baseline.server["model"] == "engine0"  # an engine name is a model alias
    assert parrot.server["url"] == "in-process"
    assert baseline.engine["external"] == url
    # Its counters came over /metrics, in our names; every call was a plain request.
    assert baseline.tokens.source == "parrot_actors"
    assert baseline.tokens.generated_tokens > 0
    assert len(routes) == baseline.round_trips + 1  # every baseline call and the warm-up
    assert {s.function for s in routes} == {"openai"}  # no Parrot API call reached it
    assert body["outputs_differ"] == []  # the same greedy text on the other server
    assert f"{baseline.label}: parrot_actors {baseline.server['version']} at {url}" in (
        capsys.readouterr().out
    )


def test_baseline_url_refused_with_a_simulated_run(tmp_path):
    argv = _argv("chain_summary", str(tmp_path), "--sim", "a100")
    argv += ["--baseline-url", "http://127.0.0.1:9"]
    with pytest.raises(ValueError, match="--baseline-url http://127.0.0.1:9 is a real server"):
        bench(parser().parse_args(argv), argv)
