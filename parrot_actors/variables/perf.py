"""Performance objectives and the parameter annotations of semantic functions."""

from __future__ import annotations

import json
from typing import Any

from parrot_actors.errors import InvalidRequestError, TemplateError
from parrot_actors.messages import Grammar

LATENCY = "latency"
"""Objective: finish this variable's producer (and everything upstream) as soon as possible."""
THROUGHPUT = "throughput"
"""Objective: this variable may wait; batch its producer for throughput."""
OBJECTIVES = (LATENCY, THROUGHPUT)

_SAMPLING_KEYS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "ignore_eos",
    "json_schema",
    "regex",
    "choices",
)
GRAMMAR_KEYS = ("json_schema", "regex", "choices")
"""Sampling keywords that constrain an output (at most one per output)."""


def normalize_constraint(sampling: dict[str, object], where: str) -> type | None:
    """Check and normalize an output's constraint in `sampling` (in place): `json_schema` (a
    dict, a pydantic model class, or JSON text) becomes JSON text, `choices` a list of str.
    Returns the pydantic model class when one was given (what `Variable.parsed` builds).
    Raises `TemplateError` naming `where` for two constraints, or one that does not compile
    (engines.grammar.compile_grammar, llguidance)."""
    # Imported here: the engine layer (llguidance, torch) loads only when a constraint is used.
    from parrot_actors.engines.grammar import compile_grammar

    given = [k for k in GRAMMAR_KEYS if sampling.get(k) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise TemplateError(f"{where}: {given}: at most one of {GRAMMAR_KEYS} per output")
    model_type: type | None = None
    schema = sampling.get("json_schema")
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        model_type = schema
        sampling["json_schema"] = json.dumps(schema.model_json_schema())
    elif isinstance(schema, (dict, bool)):
        sampling["json_schema"] = json.dumps(schema)
    elif schema is not None and not isinstance(schema, str):
        raise TemplateError(
            f"{where}: json_schema={schema!r}: a dict, a pydantic model class or JSON text"
        )
    if sampling.get("choices") is not None:
        choices = sampling["choices"]
        if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
            raise TemplateError(f"{where}: choices={choices!r}: a list of strings")
        sampling["choices"] = [str(c) for c in choices]
    try:
        compile_grammar(grammar_of(sampling))
    except InvalidRequestError as exc:
        raise TemplateError(f"{where}: {exc}") from None
    return model_type


def grammar_of(sampling: dict[str, Any]) -> Grammar | None:
    """The `Grammar` of normalized sampling keywords (None: unconstrained)."""
    if sampling.get("json_schema") is not None:
        return Grammar(json_schema=sampling["json_schema"])
    if sampling.get("regex") is not None:
        return Grammar(regex=sampling["regex"])
    if sampling.get("choices") is not None:
        return Grammar(choices=tuple(sampling["choices"]))
    return None


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
    seed=...)`), and at most one constraint the output always follows (constrained
    decoding): `json_schema=` a JSON Schema dict or a pydantic model class, `regex=` a regular
    expression, `choices=[...]` a list of strings; `await var.parsed()` then returns the
    parsed value. Raises `TemplateError` for an unknown keyword or a constraint that does not
    compile.
    """

    def __init__(self, **sampling: object) -> None:
        unknown = sorted(set(sampling) - set(_SAMPLING_KEYS))
        if unknown:
            raise TemplateError(f"pa.Output{tuple(unknown)}: allowed keywords are {_SAMPLING_KEYS}")
        self.sampling = dict(sampling)
        self.model_type = normalize_constraint(self.sampling, "pa.Output")

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
