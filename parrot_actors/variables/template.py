"""Parsing a semantic function's docstring template, at decoration time.

`{{input:x}}`, `{{output:y}}` and plain `{{x}}` (direction from the annotation; parameters that
are neither Input nor Output are rendered with str()). The template is the docstring with its
indentation removed (inspect.cleandoc); text after the last output is never sent.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from parrot_actors.errors import TemplateError
from parrot_actors.variables.perf import direction_of

_PLACEHOLDER = re.compile(r"\{\{\s*(?:(\w+)\s*:\s*)?(\w+)\s*\}\}")


@dataclass(frozen=True)
class Text:
    """Constant template text."""

    text: str


@dataclass(frozen=True)
class Slot:
    """A placeholder: `kind` is "input", "output" or "param" (rendered with str())."""

    name: str
    kind: str


@dataclass(frozen=True)
class Template:
    """A parsed template: pieces in order, ending with the last output.

    inputs / outputs / params: parameter names of each kind, in first-use order.
    """

    pieces: tuple[Text | Slot, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...]


def parse_template(
    fn_name: str, doc: str | None, annotations: dict[str, object], parameters: list[str]
) -> Template:
    """Parse `doc` for the function `fn_name` with the given parameter names and annotations.

    Raises `TemplateError`, naming the function and the placeholder, for: no docstring, a
    placeholder with no parameter, a parameter never used, an unknown direction word, an
    annotation that contradicts the placeholder, an output used twice, two outputs with no
    text between them, and a template with no output.
    """
    if not doc or not doc.strip():
        raise TemplateError(f"semantic function {fn_name!r} has no docstring template")
    text = inspect.cleandoc(doc)
    pieces: list[Text | Slot] = []
    used: dict[str, str] = {}
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            pieces.append(Text(text[pos : m.start()]))
        pos = m.end()
        word, name = m.group(1), m.group(2)
        where = f"in {fn_name!r}: placeholder {m.group(0)!r}"
        if name not in parameters:
            raise TemplateError(
                f"{where} has no parameter named {name!r} (parameters: {parameters})"
            )
        from_annotation = direction_of(annotations.get(name))
        if word is not None and word not in ("input", "output"):
            raise TemplateError(f"{where}: unknown direction {word!r}; allowed are input, output")
        if word is not None and from_annotation is not None and word != from_annotation:
            raise TemplateError(
                f"{where} says {word!r} but the annotation of {name!r} says {from_annotation!r}"
            )
        kind = word or from_annotation or "param"
        if kind == "output":
            if name in used:
                raise TemplateError(f"{where}: output {name!r} is used twice")
            last = next(
                (p for p in reversed(pieces) if not (isinstance(p, Text) and not p.text.strip())),
                None,
            )
            if isinstance(last, Slot) and last.kind == "output":
                raise TemplateError(
                    f"{where}: outputs {last.name!r} and {name!r} have no text between them"
                )
        elif used.get(name) == "output":
            raise TemplateError(f"{where}: {name!r} is an output and cannot be read")
        used.setdefault(name, kind)
        pieces.append(Slot(name, kind))
    unused = [p for p in parameters if p not in used]
    if unused:
        raise TemplateError(f"in {fn_name!r}: parameter(s) {unused} never used in the template")
    outputs = tuple(n for n, k in used.items() if k == "output")
    if not outputs:
        raise TemplateError(f"in {fn_name!r}: the template has no output placeholder")
    last_out = max(i for i, p in enumerate(pieces) if isinstance(p, Slot) and p.kind == "output")
    return Template(
        pieces=tuple(pieces[: last_out + 1]),
        inputs=tuple(n for n, k in used.items() if k == "input"),
        outputs=outputs,
        params=tuple(n for n, k in used.items() if k == "param"),
    )
