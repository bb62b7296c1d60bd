"""Fitting the step-time model to measured steps: the window a real engine records its steps
in, the least-squares fit of the "cpu-fitted" device's coefficients, and its file format.

Every real engine records each step's shape and measured duration (`EngineCore.step_fit`);
`StepTimeFit.fit` solves for the seconds per unit of each of `step_time.FEATURES`, and
`/metrics` and `EngineStats.step_time` show the fit and its error. `save_fit` / `load_fit` keep a
fit for `SimConfig(gpu="cpu-fitted", fit=PATH)`. Units: seconds, relative errors.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parrot_actors.engines.step_time import (
    FEATURES,
    MODELS,
    ModelShape,
    StepShape,
    StepTimeModel,
    _check_coefficients,
    _count,
    features,
)
from parrot_actors.errors import InvalidRequestError

FIT_FORMAT = "parrot_actors.step_time_fit/1"
"""The `format` field of a saved fit."""


@dataclass(frozen=True)
class FitError:
    """How well a model predicts measured steps: samples; median and 90th percentile of the
    relative error |predicted - measured| / measured; mean absolute error (s)."""

    samples: int
    median_abs_error: float
    p90_abs_error: float
    mean_abs_error_s: float


class StepTimeFit:
    """Measured steps (shape, seconds) in a bounded window (the latest `window`) and a fit of the
    cpu-fitted coefficients to them. The fit is least squares on relative error (each row
    divided by its measured time, so short and long steps count alike) with nonnegative
    coefficients (`nnls`, Lawson-Hanson). `model` is any `ModelShape.resolve` input; one that
    does not resolve (an engine's free-form name) is kept as `model_name` with `model` None.
    `recorded` counts every sample ever accepted (the window holds the last `window`).
    Thread-safe."""

    def __init__(self, model: ModelShape | str | Path | Mapping[str, Any], window: int = 4096,
                 min_samples: int = 32) -> None:
        self.window = _count(window, "window", 1)
        self.min_samples = _count(min_samples, "min_samples", len(FEATURES))
        try:
            self.model: ModelShape | None = ModelShape.resolve(model)
        except InvalidRequestError:
            self.model = None
        self.model_name = self.model.name if self.model else str(model)
        self.coefficients: dict[str, float] | None = None
        self.error: FitError | None = None
        self.recorded = 0  # samples ever accepted: tells a cache whether the window moved
        self._samples: deque[tuple[StepShape, float]] = deque(maxlen=self.window)
        self._lock = threading.Lock()

    def record(self, shape: StepShape, seconds: float) -> None:
        """Add one measured step; `seconds` <= 0 or not finite is ignored."""
        if 0 < seconds < math.inf:
            with self._lock:
                self._samples.append((shape, float(seconds)))
                self.recorded += 1

    def __len__(self) -> int:
        return len(self._samples)

    def samples(self) -> list[tuple[StepShape, float]]:
        """A copy of the window (shape, seconds), oldest first."""
        with self._lock:
            return list(self._samples)

    def fit(self) -> StepTimeModel | None:
        """Fit the window; None while it has fewer than `min_samples`. Sets `coefficients` and
        `error` and returns the cpu-fitted model (None also when `model` is unknown)."""
        samples = self.samples()
        if len(samples) < self.min_samples:
            return None
        x = np.array([features(s) for s, _ in samples], dtype=np.float64)
        y = np.array([t for _, t in samples], dtype=np.float64)
        x /= y[:, None]
        target = np.ones_like(y)
        norms = np.linalg.norm(x, axis=0)
        norms[norms == 0] = 1.0  # an all-zero feature keeps coefficient 0
        # Unit columns: the features span ~1 to ~1e6, which would skew the solver's tolerances.
        coef = nnls(x / norms, target) / norms
        self.coefficients = {f: float(c) for f, c in zip(FEATURES, coef)}
        model = StepTimeModel(self.model or MODELS["smollm2-135m"], None,
                              coefficients=self.coefficients)
        self.error = self.evaluate(model, samples)
        return model if self.model is not None else None

    def evaluate(self, model: StepTimeModel,
                 samples: Iterable[tuple[StepShape, float]] | None = None) -> FitError:
        """`model`'s error on `samples` (default: the window)."""
        pairs = self.samples() if samples is None else list(samples)
        if not pairs:
            raise InvalidRequestError("evaluate: no samples (record steps or pass samples=)")
        pred = np.array([model.predict(s) for s, _ in pairs])
        meas = np.array([t for _, t in pairs])
        rel = np.abs(pred - meas) / meas
        return FitError(len(pairs), float(np.median(rel)), float(np.percentile(rel, 90)),
                        float(np.mean(np.abs(pred - meas))))

    def summary(self) -> dict[str, float]:
        """For /metrics: "samples", and after a fit each coefficient (s per unit of its
        feature), "median_abs_error" and "p90_abs_error" (relative)."""
        out: dict[str, float] = {"samples": float(len(self))}
        if self.coefficients is not None and self.error is not None:
            out.update(self.coefficients)
            out.update(median_abs_error=self.error.median_abs_error,
                       p90_abs_error=self.error.p90_abs_error)
        return out

    def to_json(self) -> dict[str, Any]:
        """The fit as a JSON object (the format `save_fit` writes)."""
        return _fit_json(self.model, self.coefficients, self.error, self.model_name)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> dict[str, float]:
        """The coefficients of a `to_json` / `save_fit` object, validated."""
        if data.get("format") != FIT_FORMAT or not isinstance(data.get("coefficients"), Mapping):
            raise InvalidRequestError(f"not a step-time fit (format {FIT_FORMAT!r} expected)")
        return _check_coefficients(data["coefficients"])


def nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0, for `a` `[rows, n]` and `b` `[rows]`: the active-set
    algorithm of Lawson and Hanson ("Solving Least Squares Problems", 1974, ch. 23; the one
    behind scipy.optimize.nnls). Features that are collinear on the data (a decode step's
    tokens and sequences) get the solution's split, not a dropped feature. Returns `[n]`."""
    n = a.shape[1]
    passive = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    for _ in range(3 * n + 3):  # each outer step adds one feature; a bound against cycling
        grad = a.T @ (b - a @ x)
        free = ~passive & (grad > tol)
        if not free.any():
            break
        passive[int(np.argmax(np.where(free, grad, -np.inf)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            # Step from x towards z until the first passive coefficient reaches 0; drop it.
            bad = passive & (z <= tol)
            alpha = float(np.min(x[bad] / (x[bad] - z[bad])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def _fit_json(model: ModelShape | None, coefficients: Mapping[str, float] | None,
              error: FitError | None, name: str = "") -> dict[str, Any]:
    return {"format": FIT_FORMAT, "model_name": model.name if model else name,
            "model": asdict(model) if model else None,
            "coefficients": dict(coefficients) if coefficients is not None else None,
            "error": asdict(error) if error else None}


def save_fit(path: str | Path, model_shape: ModelShape, coefficients: Mapping[str, float],
             error: FitError | None = None) -> None:
    """Write a fit to `path` (JSON; replaced atomically) for `load_fit`."""
    data = _fit_json(model_shape, _check_coefficients(coefficients), error)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_fit(path: str | Path) -> StepTimeModel:
    """The cpu-fitted model saved at `path` by `save_fit`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"step-time fit {str(path)!r}: cannot read it ({e})") from None
    coefficients = StepTimeFit.from_json(data)
    if not isinstance(data.get("model"), Mapping):
        raise InvalidRequestError(f"step-time fit {str(path)!r} has no model shape")
    try:
        shape = ModelShape(**data["model"])
    except TypeError as e:
        raise InvalidRequestError(f"step-time fit {str(path)!r}: bad model shape ({e})") from None
    return StepTimeModel.for_device("cpu-fitted", shape, dtype=None, coefficients=coefficients)


__all__ = ["FIT_FORMAT", "FitError", "StepTimeFit", "load_fit", "nnls", "save_fit"]
