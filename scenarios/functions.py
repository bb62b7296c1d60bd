"""Semantic functions built at run time, and the prompt text they render.

A scenario's prompts depend on its flags (output lengths, system prompts read from data), so
its semantic functions are built from a template string here rather than written as decorated
functions. `render` gives the exact text the Parrot executor sends before the output, which the
request-level baseline sends to the OpenAI-compatible completions endpoint: with greedy
decoding both modes must produce the same text (docs/design.md, "Baseline for every comparison").
"""

from __future__ import annotations

import inspect

import parrot_actors as pa
from parrot_actors.variables.function import SemanticFunction
from parrot_actors.variables.template import Slot, Text


def make_function(
    name: str, template: str, inputs: list[str], params: list[str], max_tokens: int
) -> SemanticFunction:
    """A semantic function `name` with the given docstring `template`, input parameters
    (`pa.Input`), plain parameters (rendered with str()), and one output named `out`, greedy
    (temperature 0) with `max_tokens` tokens at most. Raises `pa.TemplateError` for a template
    that does not use exactly these names."""

    def fn(*args: object, **kwargs: object) -> None:
        """Placeholder body; the docstring is set below."""

    names = [*inputs, *params, "out"]
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    fn.__annotations__ = {**{n: pa.Input for n in inputs}, "out": pa.Output}
    fn.__name__ = name
    fn.__doc__ = template
    return pa.semantic_function(max_tokens=max_tokens, temperature=0.0)(fn)


def max_tokens_of(fn: SemanticFunction) -> int:
    """The `max_tokens` of the function's output (tokens)."""
    return int(fn.defaults["max_tokens"])


def render(fn: SemanticFunction, **values: object) -> str:
    """The prompt text of `fn` before its output for these argument values (inputs and plain
    parameters as text). Raises `KeyError` naming a missing argument."""
    out: list[str] = []
    for piece in fn.template.pieces:
        if isinstance(piece, Text):
            out.append(piece.text)
        elif isinstance(piece, Slot) and piece.kind == "output":
            break
        else:
            out.append(str(values[piece.name]))
    return "".join(out)
