"""`@semantic_function`: a Python function whose docstring is an LLM prompt template."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any, overload

from parrot_actors.errors import TemplateError
from parrot_actors.variables.current import current_runtime
from parrot_actors.variables.graph import SemanticCall, build_pieces
from parrot_actors.variables.perf import GRAMMAR_KEYS, Output, normalize_constraint, sampling_keys
from parrot_actors.variables.template import Template, parse_template
from parrot_actors.variables.variable import Variable


class SemanticFunction:
    """A parsed semantic function. Calling it returns its output `Variable` (a tuple, in
    parameter order, if there are several) at once and submits the call to the current runtime.

    Raises `TemplateError` on call for missing or unexpected arguments, and `RuntimeError`-like
    `TemplateError` when no runtime is active.
    """

    def __init__(
        self, fn: Callable[..., Any], defaults: dict[str, object], model: str | None, chat: bool
    ) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.signature = inspect.signature(fn)
        try:
            annotations = inspect.get_annotations(fn, eval_str=True)
        except Exception as exc:  # an annotation that does not evaluate
            raise TemplateError(f"in {self.name!r}: cannot evaluate annotations: {exc}") from exc
        params = list(self.signature.parameters)
        self.template: Template = parse_template(self.name, fn.__doc__, annotations, params)
        self.defaults = dict(defaults)
        default_type = normalize_constraint(self.defaults, f"semantic_function {self.name}")
        self.output_sampling = {
            name: dict(annotations[name].sampling)
            for name in self.template.outputs
            if isinstance(annotations.get(name), Output)
        }
        # What `Variable.parsed` makes of each output's text: its own constraint's, else the
        # function's default constraint's (when the output sets none of its own).
        self._parsers: dict[str, Callable[[str], object] | None] = {}
        for name in self.template.outputs:
            own = annotations.get(name)
            if isinstance(own, Output) and any(k in own.sampling for k in GRAMMAR_KEYS):
                self._parsers[name] = parser_of(own.sampling, own.model_type)
            else:
                self._parsers[name] = parser_of(self.defaults, default_type)
        self.model = model
        self.chat = chat
        self._output_order = [p for p in params if p in self.template.outputs]
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<semantic_function {self.name}>"

    def bind(self, *args: object, **kwargs: object) -> tuple[SemanticCall, list[Variable]]:
        """Build the call for these arguments without submitting it (outputs may be passed as
        Variables; missing outputs get new ones)."""
        try:
            bound = self.signature.bind_partial(*args, **kwargs)
        except TypeError as exc:
            raise TemplateError(f"{self.name}: {exc}") from exc
        values = dict(bound.arguments)
        missing = [
            n
            for n in self.signature.parameters
            if n not in values and n not in self.template.outputs
        ]
        if missing:
            raise TemplateError(f"{self.name}: missing argument(s) {missing}")
        outs: dict[str, Variable] = {}
        for name in self.template.outputs:
            given = values.get(name)
            if given is not None and not isinstance(given, Variable):
                raise TemplateError(
                    f"{self.name}: output {name!r} takes a pa.Variable or nothing, "
                    f"got {type(given).__name__}"
                )
            outs[name] = given or Variable(name=f"{self.name}.{name}")
            outs[name].parser = self._parsers.get(name)
        call = SemanticCall(
            self.name, build_pieces(self, values, outs), model=self.model, chat=self.chat
        )
        return call, [outs[n] for n in self._output_order]

    def __call__(self, *args: object, **kwargs: object) -> Any:
        """Submit the call; its output `Variable`, or a tuple of them in parameter order when
        the template has several outputs (so the static type is `Any`)."""
        runtime = current_runtime()
        call, outs = self.bind(*args, **kwargs)
        runtime.submit(call)
        return outs[0] if len(outs) == 1 else tuple(outs)


def parser_of(
    sampling: dict[str, object], model_type: type | None
) -> Callable[[str], object] | None:
    """How to parse an output's text: a pydantic model's `model_validate_json`, `json.loads`
    for a JSON Schema output, None (the text itself) otherwise."""
    if model_type is not None:
        return model_type.model_validate_json  # type: ignore[attr-defined, no-any-return]
    if sampling.get("json_schema") is not None:
        return json.loads
    return None


@overload
def semantic_function(fn: Callable[..., Any], /) -> SemanticFunction: ...


@overload
def semantic_function(
    fn: None = None, /, *, model: str | None = None, chat: bool = False, **sampling: object
) -> Callable[[Callable[..., Any]], SemanticFunction]: ...


def semantic_function(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    model: str | None = None,
    chat: bool = False,
    **sampling: object,
) -> SemanticFunction | Callable[[Callable[..., Any]], SemanticFunction]:
    """Decorator: `@pa.semantic_function(max_tokens=..., temperature=..., top_p=..., top_k=...,
    stop=[...], seed=..., model=None, chat=False)`; also usable bare. Sampling keywords are
    defaults for every output (`pa.Output(...)` overrides per output). `model` names the model
    the call needs; `chat=True` wraps the rendered prompt as one user message of the model's
    chat template. Raises `TemplateError` at decoration time for a malformed template or an
    unknown keyword."""
    unknown = sorted(set(sampling) - set(sampling_keys()))
    if unknown:
        raise TemplateError(
            f"semantic_function{tuple(unknown)}: allowed keywords are "
            f"{sampling_keys()} plus model and chat"
        )

    def wrap(f: Callable[..., Any]) -> SemanticFunction:
        return SemanticFunction(f, sampling, model, chat)

    return wrap(fn) if fn is not None else wrap
