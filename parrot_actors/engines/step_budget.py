"""The time budget of a step that carries latency work: throughput work fills only the slack.

A step is composed latency work first (`EngineCore._schedule_once`). When the first throughput
request comes up, the step's latency work is priced with the engine's step-time model, and the
step may then grow to at most `(1 + slack)` times that: each throughput request gets the most
tokens that keep the predicted step under the limit. So a latency call's decode step takes at
most `slack` longer than it would alone, on any device, and the number of throughput tokens
that buys follows from the model of that engine (hundreds on a GPU, where a decode step is
bound by the weight read and extra prefill tokens are nearly free; tens on a CPU), never from a
constant. A step with no latency work has no limit (throughput takes full batches).

The same idea as Sarathi-Serve's token budget derived from a TBT SLO (Agrawal et al., OSDI 2024,
§4.3, arXiv 2403.02310), applied by objective as Parrot separates latency from throughput work
(Lin et al., OSDI 2024, §5.4). Units: tokens, seconds.
"""

from __future__ import annotations

from parrot_actors.engines.step_time import StepPredictor, StepTotals
from parrot_actors.errors import InvalidRequestError


class StepBudget:
    """Prices the step being composed and says how much throughput work still fits.

    model: the engine's step-time model. slack: the share a step with latency work may grow by
    for throughput work (>= 0). Use: `add` every chosen item (latency work first), `fit` before
    each throughput item. Raises `InvalidRequestError` for a negative or non-finite slack."""

    def __init__(self, model: StepPredictor, slack: float) -> None:
        if not 0 <= slack < float("inf"):
            raise InvalidRequestError(f"latency_step_slack={slack!r}: must be >= 0 and finite")
        self.model = model
        self.slack = float(slack)
        self.totals = StepTotals()
        self.limit_s: float | None = None
        self.latency_s: float | None = None
        self._throughput_added = False

    @staticmethod
    def _with(totals: StepTotals, past: int, n: int) -> StepTotals:
        # A single token after computed ones is a decode (as `EngineCore._plan` lays it out).
        if n == 1 and past > 0:
            return totals.add_decode(past + 1)
        return totals.add_prefill(n, past)

    def add(self, past: int, n: int, throughput: bool = False) -> None:
        """A chosen item: `n` new tokens of a context with `past` tokens computed (`throughput`:
        a throughput item, after `fit`)."""
        self.totals = self._with(self.totals, past, n)
        self._throughput_added |= throughput

    def fit(self, past: int, n_max: int) -> int:
        """Tokens (0..n_max) of a throughput item on a context with `past` computed tokens that
        keep the predicted step within the limit. The limit is set at the first call: (1 +
        slack) x the predicted time of what was added before (the latency work); none when
        nothing was. At least one token of the step's first throughput item fits, so throughput
        work advances every step however long latency work runs."""
        if self.limit_s is None and self.latency_s is None:
            self.latency_s = self.model.predict_totals(self.totals) if self.totals.seqs else 0.0
            self.limit_s = self.latency_s * (1 + self.slack) if self.totals.seqs else None
        if n_max <= 0:
            return 0
        if self.limit_s is None:
            return n_max
        floor = 0 if self._throughput_added else 1
        if self._cost(past, n_max) <= self.limit_s:
            lo = n_max
        else:
            # Largest n with the step under the limit; the model grows with n (bisection).
            lo, hi = 0, n_max
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._cost(past, mid) <= self.limit_s:
                    lo = mid
                else:
                    hi = mid
        return max(lo, floor)

    def _cost(self, past: int, n: int) -> float:
        return self.model.predict_totals(self._with(self.totals, past, n))
