"""Turning a `SubmitCall` from the wire into a `SemanticCall` of the shared graph.

The wire template is parsed by the semantic functions' own parser (`split_template`) but taken
verbatim (no docstring dedent), so the prompt a remote call sends is byte for byte the embedded
one. All validation happens before anything is registered: a rejected call leaves no trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from parrot_actors.engines.grammar import compile_grammar
from parrot_actors.errors import InvalidRequestError
from parrot_actors.messages import SamplingParams
from parrot_actors.server.errors import BadRequestError, ConflictError
from parrot_actors.server.protocol import Arg, Sampling, SubmitCall
from parrot_actors.server.sessions import Session
from parrot_actors.variables.graph import Piece, SemanticCall
from parrot_actors.variables.perf import GRAMMAR_KEYS, grammar_of
from parrot_actors.variables.template import Slot, Text, split_template
from parrot_actors.variables.variable import Variable


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
    """Split `template` (taken verbatim) into text and `Slot`s, ending with the last output,
    with the semantic functions' parser (`split_template`): a plain `{{x}}` is an output if its
    arg has `sampling`, an input if it has `var`, else a parameter. Raises `TemplateError`
    (422) as `split_template` does."""

    def kind_of(pname: str, word: str | None, where: str) -> str:
        arg = args[pname]
        return word or (
            "output" if arg.sampling is not None else "input" if arg.var is not None else "param"
        )

    parsed = split_template(name, template, list(args), kind_of, "argument")
    return [p.text if isinstance(p, Text) else p for p in parsed.pieces]


def sampling_items(
    defaults: Sampling | None, own: Sampling | None
) -> tuple[tuple[str, object], ...]:
    """An output's sampling keywords: the call's defaults overridden by the output's own,
    sorted as `Piece.sampling` holds them. Raises `InvalidRequestError` (400) for values the
    engines refuse."""
    # `Sampling` field values (typed by the decoder) for the same-named `SamplingParams` fields.
    kw: dict[str, Any] = {}
    for s in (defaults, own):
        if s is None:
            continue
        if any(getattr(s, k) is not None for k in GRAMMAR_KEYS):
            for k in GRAMMAR_KEYS:  # an output's constraint replaces the call's default one
                kw.pop(k, None)
        for field in s.__struct_fields__:
            value = getattr(s, field)
            if value is not None:
                kw[field] = value
    if "stop" in kw:
        stop = kw["stop"]
        kw["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    given = [k for k in GRAMMAR_KEYS if k in kw]
    if len(given) > 1:
        raise InvalidRequestError(f"sampling sets {given}: at most one of {GRAMMAR_KEYS}")
    grammar = grammar_of(kw)
    if grammar is not None:
        compile_grammar(grammar)
    plain = {k: v for k, v in kw.items() if k not in GRAMMAR_KEYS}
    check_sampling(SamplingParams(**plain, grammar=grammar))
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
