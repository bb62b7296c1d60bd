"""Parsing prompt templates: a semantic function's docstring at decoration time, and a call's
template when the service receives it (`split_template` is the one parser of both).

`{{input:x}}`, `{{output:y}}` and plain `{{x}}` (direction from the annotation, or on the wire
from the argument; parameters that are neither input nor output are rendered with str()). A
function's template is its docstring with the indentation removed (inspect.cleandoc); text
after the last output is never sent.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
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
    """Parse the docstring `doc` of the semantic function `fn_name` (indentation removed with
    `inspect.cleandoc`), with its parameter names and annotations: a plain `{{x}}` takes its
    direction from the annotation (`pa.Input` / `pa.Output`), else it is a parameter.

    Raises `TemplateError` as `split_template` does, and for no docstring or an annotation
    that contradicts the placeholder's direction word.
    """
    if not doc or not doc.strip():
        raise TemplateError(f"semantic function {fn_name!r} has no docstring template")

    def kind_of(name: str, word: str | None, where: str) -> str:
        from_annotation = direction_of(annotations.get(name))
        if word is not None and from_annotation is not None and word != from_annotation:
            raise TemplateError(
                f"{where} says {word!r} but the annotation of {name!r} says {from_annotation!r}"
            )
        return word or from_annotation or "param"

    return split_template(fn_name, inspect.cleandoc(doc), parameters, kind_of, "parameter")


def split_template(
    name: str,
    text: str,
    names: Sequence[str],
    kind_of: Callable[[str, str | None, str], str],
    noun: str = "parameter",
) -> Template:
    """Split `text` into `Text` and `Slot` pieces, ending with the last output: the one
    template parser of semantic functions and of calls sent to the service.

    names: the placeholders' allowed names (`noun`s: parameters or arguments). kind_of(name,
    direction word or None, where): the slot's kind, "input", "output" or "param" (it may raise
    `TemplateError` itself). Raises `TemplateError`, naming `name` and the placeholder, for: a
    placeholder with no such name, an unknown direction word, an output used twice, an output
    read as an input, two outputs with no text between them, a name never used, no output,
    and an output with no prompt before it.
    """
    pieces: list[Text | Slot] = []
    used: dict[str, str] = {}
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            pieces.append(Text(text[pos : m.start()]))
        pos = m.end()
        word, pname = m.group(1), m.group(2)
        where = f"in {name!r}: placeholder {m.group(0)!r}"
        if pname not in names:
            raise TemplateError(f"{where} has no {noun} named {pname!r} ({noun}s: {list(names)})")
        if word is not None and word not in ("input", "output"):
            raise TemplateError(f"{where}: unknown direction {word!r}; allowed are input, output")
        kind = kind_of(pname, word, where)
        if kind == "output":
            if pname in used:
                raise TemplateError(f"{where}: output {pname!r} is used twice")
            last = next(
                (p for p in reversed(pieces) if not (isinstance(p, Text) and not p.text.strip())),
                None,
            )
            if isinstance(last, Slot) and last.kind == "output":
                raise TemplateError(
                    f"{where}: outputs {last.name!r} and {pname!r} have no text between them"
                )
        elif used.get(pname) == "output":
            raise TemplateError(f"{where}: {pname!r} is an output and cannot be read")
        used.setdefault(pname, kind)
        pieces.append(Slot(pname, kind))
    unused = [n for n in names if n not in used]
    if unused:
        raise TemplateError(f"in {name!r}: {noun}(s) {unused} never used in the template")
    outputs = tuple(n for n, k in used.items() if k == "output")
    if not outputs:
        raise TemplateError(f"in {name!r}: the template has no output placeholder")
    last_out = max(i for i, p in enumerate(pieces) if isinstance(p, Slot) and p.kind == "output")
    pieces = pieces[: last_out + 1]
    first = next(p for p in pieces if not (isinstance(p, Text) and not p.text))
    if isinstance(first, Slot) and first.kind == "output":
        raise TemplateError(f"in {name!r}: output {first.name!r} has no prompt before it")
    return Template(
        pieces=tuple(pieces),
        inputs=tuple(n for n, k in used.items() if k == "input"),
        outputs=outputs,
        params=tuple(n for n, k in used.items() if k == "param"),
    )
