"""Performance objectives and the parameter annotations of semantic functions."""

from __future__ import annotations

from parrot_actors.errors import TemplateError

LATENCY = "latency"
"""Objective: finish this variable's producer (and everything upstream) as soon as possible."""
THROUGHPUT = "throughput"
"""Objective: this variable may wait; batch its producer for throughput."""
OBJECTIVES = (LATENCY, THROUGHPUT)

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "ignore_eos")


def check_objective(perf: str) -> str:
    """Return `perf` if it is LATENCY or THROUGHPUT, else raise `TemplateError`."""
    if perf not in OBJECTIVES:
        raise TemplateError(f"perf={perf!r}: allowed are pa.LATENCY and pa.THROUGHPUT")
    return perf


class Input:
    """Annotation of a semantic function parameter whose value comes from a Variable."""


class Output:
    """Annotation of a semantic function parameter the LLM generates.

    Use the class (`code: pa.Output`) or an instance with sampling overrides for this output
    (`test: pa.Output(max_tokens=128, temperature=0.7, top_p=..., top_k=..., stop=[...],
    seed=...)`). Raises `TemplateError` for an unknown keyword.
    """

    def __init__(self, **sampling: object) -> None:
        unknown = sorted(set(sampling) - set(_SAMPLING_KEYS))
        if unknown:
            raise TemplateError(f"pa.Output{tuple(unknown)}: allowed keywords are {_SAMPLING_KEYS}")
        self.sampling = dict(sampling)

    def __repr__(self) -> str:
        return f"pa.Output({', '.join(f'{k}={v!r}' for k, v in self.sampling.items())})"


def direction_of(annotation: object) -> str | None:
    """ "input", "output", or None for a parameter rendered with str()."""
    if annotation is Input or isinstance(annotation, Input):
        return "input"
    if annotation is Output or isinstance(annotation, Output):
        return "output"
    return None


def sampling_keys() -> tuple[str, ...]:
    """The sampling keywords `semantic_function` and `Output` accept."""
    return _SAMPLING_KEYS
