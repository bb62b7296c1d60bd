"""The time budget of steps with latency work (`StepBudget`), with an exact linear model."""

from __future__ import annotations

import pytest

from parrot_actors.engines.engine import build_core
from parrot_actors.engines.step_budget import StepBudget
from parrot_actors.engines.step_time import StepShape, StepTimeModel, StepTotals
from parrot_actors.errors import InvalidRequestError
from tests.conftest import tiny_config
from tests.test_engine_robust import steps_beside_throughput_work


class Linear:
    """10 ms per step plus 1 ms per new token plus 0.01 ms per decode KV token (exact)."""

    def predict_totals(self, t: StepTotals) -> float:
        return 0.010 + 0.001 * t.new + 0.00001 * t.decode_kv


def test_totals_equal_the_shape_they_add_up_to():
    t = StepTotals().add_prefill(30, 10).add_decode(65).add_decode(12)
    shape = StepShape(prefill=[(30, 10)], decode=[65, 12])
    assert t == StepTotals.of(shape)
    assert (t.new, t.pairs, t.prefill_kv, t.decode_kv, t.seqs, t.decodes) == (
        32, 30 * (10 + 31 / 2), 40, 77, 3, 2
    )
    model = StepTimeModel.for_device(
        "cpu-fitted", "smollm2-135m", dtype=None,
        coefficients=dict(step=0.01, tokens=1e-3, logit_rows=2e-3, prefill_attn=1e-7,
                          decode_kv=1e-5, sequences=3e-4),
    )
    assert model.predict_totals(t) == pytest.approx(model.predict(shape), rel=1e-12)


def test_throughput_fills_only_the_slack_of_the_latency_work():
    budget = StepBudget(Linear(), 0.25)
    budget.add(99, 1)  # a latency decode at context 100: 10 + 1 + 1 = 12 ms alone
    # Limit 15 ms: a throughput prefill after 0 computed tokens may add 3 tokens (1 ms each).
    assert budget.fit(0, 500) == 3
    assert budget.latency_s == pytest.approx(0.012)
    assert budget.limit_s == pytest.approx(0.015)
    budget.add(0, 3, throughput=True)
    assert budget.fit(0, 500) == 0  # full: a second throughput item gets nothing
    # A throughput decode at context 50 would cost 1.5 ms: over the limit as well.
    assert budget.fit(49, 1) == 0


def test_first_throughput_item_always_advances_and_no_latency_means_no_limit():
    tight = StepBudget(Linear(), 0.0)
    tight.add(99, 1)
    assert tight.fit(0, 500) == 1  # progress: one token although the slack is 0
    tight.add(0, 1, throughput=True)
    assert tight.fit(0, 500) == 0
    free = StepBudget(Linear(), 0.25)
    assert free.fit(0, 500) == 500 and free.limit_s is None
    with pytest.raises(InvalidRequestError, match="latency_step_slack=-1"):
        StepBudget(Linear(), -1)


def test_engine_steps_follow_the_time_budget():
    core = build_core(tiny_config(prefix_caching=False, latency_step_slack=0.25))
    core.use_step_model(Linear())

    steps = steps_beside_throughput_work(core)
    # Latency fill of 10: 20 ms alone, limit 25 ms -> 5 throughput tokens. Latency decode at
    # context 11 / 12: 11.11 / 11.12 ms, limit ~13.9 ms -> 2 tokens. Alone again: the rest.
    assert steps == [
        [("lat", "fill", 0, 10), ("tp", "fill", 1, 5)],
        [("tp", "fill", 1, 2), ("lat", "generate", 0, 1)],
        [("tp", "fill", 1, 2), ("lat", "generate", 0, 1)],
        [("tp", "fill", 1, 31)],
    ]
    with pytest.raises(InvalidRequestError, match="latency_step_slack=-0.5"):
        tiny_config(latency_step_slack=-0.5).validate()
