"""Turning a `SubmitCall` from the wire into a `SemanticCall` of the shared graph.

The wire template uses the placeholder syntax of semantic functions but is taken verbatim (no
docstring dedent), so the prompt a remote call sends is byte for byte the embedded one. All
validation happens before anything is registered: a rejected call leaves no trace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from parrot_actors.errors import TemplateError
from parrot_actors.messages import SamplingParams
from parrot_actors.server.errors import BadRequestError, ConflictError
from parrot_actors.server.protocol import Arg, Sampling, SubmitCall
from parrot_actors.server.sessions import Session
from parrot_actors.variables.graph import Piece, SemanticCall
from parrot_actors.variables.variable import Variable

PLACEHOLDER = re.compile(r"\{\{\s*(?:(\w+)\s*:\s*)?(\w+)\s*\}\}")
"""`{{name}}` or `{{direction:name}}`, the syntax of semantic function templates."""


@dataclass(frozen=True)
class Slot:
    """A placeholder of a wire template: `kind` is "input", "output" or "param"."""

    name: str
    kind: str


@dataclass
class PreparedCall:
    """A validated call and the variables to register once the runtime accepts it.

    new_vars: id -> variable, for the ids this call creates; inline: the ids whose values the
    client sent (it knows them). outputs: output parameter -> variable id.
    """

    call: SemanticCall
    new_vars: dict[str, Variable]
    inline: set[str]
    outputs: dict[str, str]


def parse_wire_template(name: str, template: str, args: dict[str, Arg]) -> list[str | Slot]:
    """Split `template` into text and `Slot`s, ending with the last output.

    A plain `{{x}}` is an output if its arg has `sampling`, an input if it has `var`, else a
    parameter. Raises `TemplateError` naming the placeholder for: an unknown name or direction,
    an output used twice or read, two outputs with no text between them, an output with no
    prompt before it, no output at all, or an argument the template never uses.
    """
    pieces: list[str | Slot] = []
    used: dict[str, str] = {}
    pos = 0
    for m in PLACEHOLDER.finditer(template):
        if m.start() > pos:
            pieces.append(template[pos : m.start()])
        pos = m.end()
        word, pname = m.group(1), m.group(2)
        where = f"in {name!r}: placeholder {m.group(0)!r}"
        if pname not in args:
            raise TemplateError(f"{where} has no argument named {pname!r} (args: {sorted(args)})")
        if word is not None and word not in ("input", "output"):
            raise TemplateError(f"{where}: unknown direction {word!r}; allowed are input, output")
        arg = args[pname]
        kind = word or (
            "output" if arg.sampling is not None else "input" if arg.var is not None else "param"
        )
        if kind == "output":
            _check_output_position(where, pname, pieces, used)
        elif used.get(pname) == "output":
            raise TemplateError(f"{where}: {pname!r} is an output and cannot be read")
        used.setdefault(pname, kind)
        pieces.append(Slot(pname, kind))
    unused = sorted(set(args) - set(used))
    if unused:
        raise TemplateError(f"in {name!r}: argument(s) {unused} never used in the template")
    outs = [i for i, p in enumerate(pieces) if isinstance(p, Slot) and p.kind == "output"]
    if not outs:
        raise TemplateError(f"in {name!r}: the template has no output placeholder")
    pieces = pieces[: outs[-1] + 1]
    first = next(p for p in pieces if not (isinstance(p, str) and not p))
    if isinstance(first, Slot) and first.kind == "output":
        raise TemplateError(f"in {name!r}: output {first.name!r} has no prompt before it")
    return pieces


def _check_output_position(
    where: str, pname: str, pieces: list[str | Slot], used: dict[str, str]
) -> None:
    if pname in used:
        raise TemplateError(f"{where}: {pname!r} is used twice; an output appears once")
    last = next((p for p in reversed(pieces) if not (isinstance(p, str) and not p.strip())), None)
    if isinstance(last, Slot) and last.kind == "output":
        raise TemplateError(f"{where}: outputs {last.name!r} and {pname!r} have no text between")


def sampling_items(
    defaults: Sampling | None, own: Sampling | None
) -> tuple[tuple[str, object], ...]:
    """An output's sampling keywords: the call's defaults overridden by the output's own,
    sorted as `Piece.sampling` holds them. Raises `InvalidRequestError` (400) for values the
    engines refuse."""
    kw: dict[str, object] = {}
    for s in (defaults, own):
        if s is None:
            continue
        for field in s.__struct_fields__:
            value = getattr(s, field)
            if value is not None:
                kw[field] = value
    if "stop" in kw:
        stop = kw["stop"]
        kw["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    check_sampling(SamplingParams(**kw))
    return tuple(sorted(kw.items()))


def check_sampling(params: SamplingParams) -> SamplingParams:
    """`params.validate()`: every accepted value is numerically safe in the engines. Raises
    `InvalidRequestError` (400) naming the field and the allowed range."""
    return params.validate()


def build_call(session: Session, req: SubmitCall) -> PreparedCall:
    """Validate `req` against the session and build its call (nothing is registered yet).

    Raises `TemplateError` (422), `BadRequestError` (400) for an argument that does not fit its
    placeholder, `NotFoundError` (404) for an unknown variable id, `ConflictError` (409) for an
    id already in use, `InvalidRequestError` (400) for bad sampling.
    """
    new_vars: dict[str, Variable] = {}
    for nv in req.variables:
        if nv.id in new_vars:
            raise ConflictError(f"variables: id {nv.id!r} is listed twice")
        session.check_new_id(nv.id)
        new_vars[nv.id] = Variable(nv.value, name=nv.name or nv.id)
    inline = {vid for vid, var in new_vars.items() if var.done()}

    def lookup(var_id: str) -> Variable:
        return new_vars.get(var_id) or session.variable(var_id)

    pieces: list[Piece] = []
    outputs: dict[str, str] = {}
    for p in parse_wire_template(req.name, req.template, req.args):
        if isinstance(p, str):
            _append_text(pieces, p)
            continue
        arg = req.args[p.name]
        where = f"{req.name}: args.{p.name}"
        if p.kind == "output":
            var_id = _output_id(session, arg, where, new_vars)
            if var_id in outputs.values():
                raise BadRequestError(f"{where}: variable {var_id!r} is already another output")
            outputs[p.name] = var_id
            if var_id not in new_vars and var_id not in session.variables:
                new_vars[var_id] = Variable(name=f"{req.name}.{p.name}")
            sampling = sampling_items(req.sampling, arg.sampling)
            pieces.append(Piece("output", var=lookup(var_id), sampling=sampling))
            continue
        if arg.sampling is not None:
            raise BadRequestError(f"{where}: `sampling` is for outputs; {p.name!r} is an input")
        if (arg.var is None) == (arg.value is None):
            raise BadRequestError(f"{where}: give exactly one of `var` and `value`")
        if p.kind == "param" and arg.value is not None:
            _append_text(pieces, arg.value)
        elif arg.var is not None:
            pieces.append(Piece("input", var=lookup(arg.var)))
        else:
            pieces.append(Piece("input", var=Variable(arg.value, name=p.name)))
    call = SemanticCall(req.name, pieces, model=req.model, chat=req.chat)
    return PreparedCall(call=call, new_vars=new_vars, inline=inline, outputs=outputs)


def _output_id(session: Session, arg: Arg, where: str, new_vars: dict[str, Variable]) -> str:
    if arg.value is not None:
        raise BadRequestError(f"{where}: an output takes `var` and `sampling`, not `value`")
    if arg.var is None:
        var_id = session.new_id()
        while var_id in new_vars:
            var_id = session.new_id()
        return var_id
    return arg.var


def _append_text(pieces: list[Piece], text: str) -> None:
    if pieces and pieces[-1].kind == "text":
        pieces[-1] = Piece("text", text=pieces[-1].text + text)
    elif text:
        pieces.append(Piece("text", text=text))
