"""The policy in seconds: latency admission by predicted TPOT, attained service in predicted
engine seconds, the predicted wait behind the 429 bound (exact values with a linear model),
and the bound itself over HTTP."""

from __future__ import annotations

import threading

import pytest
from test_openai_agents import http, wait_until

from parrot_actors.engines.echo import EchoEngine
from parrot_actors.engines.step_time import StepTotals
from parrot_actors.errors import InvalidRequestError, OverloadedError
from parrot_actors.scheduler import SchedulerConfig
from parrot_actors.scheduler.policy import (
    CallInfo,
    EngineState,
    Placement,
    latency_admits,
    latency_step_s,
    predicted_wait_s,
    schedule_app,
    service_s,
)
from parrot_actors.server import BackgroundServer


class Linear:
    """10 ms per step plus 1 ms per new token plus 0.01 ms per decode KV token plus 0.001 ms
    per prefill query-key pair (exact)."""

    def predict_totals(self, t: StepTotals) -> float:
        return 0.010 + 0.001 * t.new + 0.00001 * t.decode_kv + 0.000001 * t.pairs


def lat(i: int, prompt: int = 100, new: int = 100) -> CallInfo:
    return CallInfo(call_id=i, objective="latency", seq=i, prompt_tokens=prompt,
                    max_new_tokens=new)


def test_latency_step_is_one_decode_per_call():
    # 4 decodes reading 1,000 KV tokens: 10 + 4 + 10 ms.
    assert latency_step_s(Linear(), 4, 1000) == pytest.approx(0.024, rel=1e-12)
    # KV never under one token per sequence.
    assert latency_step_s(Linear(), 4, 0) == pytest.approx(0.01404, rel=1e-12)


def test_service_counts_prompt_and_output_seconds_not_tokens():
    model = Linear()
    # 100 prompt tokens after 50 reused: 10 + 100 + 100 * (50 + 50.5) * 0.001 ms = 120.05 ms.
    prefill = service_s(model, 100, 50, 0)
    assert prefill == pytest.approx(0.12005, rel=1e-12)
    # 10 decodes at context 150 + 5 = 155: 10 * (10 + 1 + 1.55) ms = 125.5 ms.
    assert service_s(model, 100, 50, 10) == pytest.approx(0.12005 + 0.1255, rel=1e-12)
    # The same 1,000 tokens cost far more as output (1,000 steps) than as a prompt (one).
    assert service_s(model, 0, 0, 1000) > 10 * service_s(model, 1000, 0, 0)
    # Without a model: the nominal price per token, so the order is the tokens' order.
    assert service_s(None, 100, 50, 10) == pytest.approx(0.110, rel=1e-12)


def test_latency_admission_holds_the_tpot_target():
    eng = EngineState(name="a", model="m", free_blocks=1000, step_model=Linear())
    # Running 2 calls holding 400 KV tokens; a third of 200 more: 10 + 3 + 6 ms = 19 ms.
    assert latency_admits(eng, lat(3), 2, 400, None, 0.01901)
    assert not latency_admits(eng, lat(3), 2, 400, None, 0.01899)
    # The slot cap alone, and the engine's own batch size when there is no cap.
    assert not latency_admits(eng, lat(3), 2, 400, 2, None)
    full = EngineState(name="a", model="m", max_running=2, step_model=Linear())
    assert not latency_admits(full, lat(3), 2, 0, None, None)
    # A call alone on an engine always goes, whatever the target.
    assert latency_admits(eng, lat(1, 10**6, 10**6), 0, 0, None, 1e-9)
    # No model yet: no time bound.
    bare = EngineState(name="a", model="m")
    assert latency_admits(bare, lat(3), 5, 10**6, None, 1e-9)


def test_schedule_app_spreads_latency_work_by_predicted_tpot():
    a = EngineState(name="a", model="m", free_blocks=1000, step_model=Linear())
    b = EngineState(name="b", model="m", free_blocks=1000, step_model=Linear(),
                    running_calls=1, running_latency=1, latency_kv_tokens=200)
    # Calls of 200 KV tokens: a step of n of them takes 10 + n + 2n ms, within 16.1 ms for
    # n <= 2, so each engine takes 2 and the rest wait.
    out = schedule_app([lat(i) for i in range(1, 7)], [a, b], latency_tpot_s=0.0161)
    assert out == [Placement(1, "a"), Placement(2, "a"), Placement(3, "b")]


def test_predicted_wait_counts_rounds_of_the_batch():
    assert predicted_wait_s(3, 4, 2.0) == 0.0  # a slot is free
    assert predicted_wait_s(4, 4, 2.0) == 2.0  # one round ahead
    assert predicted_wait_s(11, 4, 2.0) == 4.0
    assert predicted_wait_s(12, 4, 2.0) == 6.0
    assert predicted_wait_s(1, 0, 2.0) == float("inf")


def test_wait_bounds_are_validated():
    with pytest.raises(InvalidRequestError, match="max_latency_wait_s=0"):
        SchedulerConfig(max_latency_wait_s=0).validate()
    with pytest.raises(InvalidRequestError, match="tenant_max_latency_wait_s\\['t'\\]=-1"):
        SchedulerConfig(tenant_max_latency_wait_s={"t": -1}).validate()
    assert OverloadedError("x", retry_after_s=0.2).retry_after_s == 1.0


def test_a_request_past_the_wait_bound_gets_429_with_retry_after():
    # One latency slot, each call priced at 1 ms a token (an echo engine has no model):
    # 10 prompt + 200 output tokens = 0.21 s for the one call ahead, over the 0.1 s bound.
    engine = EchoEngine(model_name="echo", delay_s=1.5)
    config = SchedulerConfig(latency_cap=1, max_latency_wait_s=0.1)
    body = {"model": "echo", "prompt": "x" * 10, "max_tokens": 200}
    with BackgroundServer([engine], scheduler=config) as server:
        first: list = []
        blocker = threading.Thread(
            target=lambda: first.append(http("POST", server.url + "/v1/completions", body))
        )
        blocker.start()
        wait_until(server, lambda rt: len(rt.scheduler.running) == 1)
        refused = http("POST", server.url + "/v1/completions", body)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"  # 0.21 - 0.1 s, at least 1 s
        message = refused.json()["error"]["message"]
        assert "predicted wait 0.21 s (1 latency calls ahead on 1 slots) is over the bound of " \
            "0.1 s for tenant 'default'" in message
        streamed = http("POST", server.url + "/v1/completions", {**body, "stream": True})
        assert streamed.status_code == 429
        small = http("POST", server.url + "/v1/completions", {**body, "max_tokens": 80})
        assert small.status_code == 200  # 0.09 s of work ahead: under the bound
        blocker.join(timeout=30)
        assert first[0].status_code == 200
        # Nothing is kept per call once it is over (the per-call tenant record is bounded).
        wait_until(server, lambda rt: not rt.scheduler.running and not rt.scheduler._tenant)


def test_latency_work_is_packed_apart_from_throughput_work():
    def eng(name: str, **kw) -> EngineState:
        return EngineState(name=name, model="m", free_blocks=1000, step_model=Linear(), **kw)

    def thr(i: int) -> CallInfo:
        return CallInfo(call_id=i, objective="throughput", seq=i, prompt_tokens=100)

    # Engine a runs 1 latency call (200 KV tokens), b runs 2 maps. One call of 200 alone:
    # 10 + 1 + 2 = 13 ms; with a's: 10 + 2 + 4 = 16 ms <= 1.25 x 13 = 16.25 ms: it joins a.
    # A third latency call would make a's step 19 ms: it goes where the least throughput
    # work runs (c, idle); the map goes to d, the one engine without latency work.
    engines = [
        eng("a", running_calls=1, running_latency=1, latency_kv_tokens=200),
        eng("b", running_calls=2),
        eng("c"),
        eng("d"),
    ]
    ready = [lat(1), lat(2), thr(3)]
    out = schedule_app(ready, engines, latency_pack_slack=0.25)
    assert out == [Placement(1, "a"), Placement(2, "c"), Placement(3, "d")]
    # Off (None), or with no throughput work anywhere: the smallest batch, as before.
    assert schedule_app(ready, engines) == [
        Placement(1, "c"), Placement(2, "d"), Placement(3, "a")
    ]
    only_latency = [eng("a", running_calls=1, running_latency=1, latency_kv_tokens=200), eng("c")]
    assert schedule_app([lat(1)], only_latency, latency_pack_slack=0.25) == [Placement(1, "c")]
