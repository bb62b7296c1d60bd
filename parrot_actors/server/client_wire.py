"""The client side of the wire: a `SemanticCall` as a `SubmitCall`, and HTTP errors back to the
typed exceptions."""

from __future__ import annotations

from typing import Any

import msgspec

from parrot_actors.errors import ParrotError
from parrot_actors.server.errors import exception_from
from parrot_actors.server.protocol import Arg, ErrorResponse, NewVariable, Sampling, SubmitCall
from parrot_actors.variables.graph import SemanticCall
from parrot_actors.variables.variable import Variable

_NAME_LIMIT = 256


def encode_call(call: SemanticCall, known: set[str]) -> SubmitCall:
    """The wire form of `call`. Variables whose ids are not in `known` (the server has never
    seen them) travel in `variables`, with their value when they have one. Text holding a
    brace is bound as a literal parameter, so no prompt text can ever parse as a
    placeholder; the server renders exactly the embedded prompt."""
    parts: list[str] = []
    args: dict[str, Arg] = {}
    names: dict[Variable, str] = {}
    new: list[NewVariable] = []
    for i, piece in enumerate(call.pieces):
        if piece.kind == "text":
            if "{" in piece.text or "}" in piece.text:
                args[f"t{i}"] = Arg(value=piece.text)
                parts.append(f"{{{{t{i}}}}}")
            else:
                parts.append(piece.text)
            continue
        var = piece.variable
        if piece.kind == "output":
            if var.id not in known:  # created with its name, for the same error messages
                new.append(NewVariable(id=var.id, name=var.name[:_NAME_LIMIT]))
            args[f"o{i}"] = Arg(var=var.id, sampling=to_sampling(piece.sampling))
            parts.append(f"{{{{output:o{i}}}}}")
            continue
        if var not in names:
            names[var] = f"a{len(names)}"
            args[names[var]] = Arg(var=var.id)
            if var.id not in known:
                value = var.value() if var.done() else None
                new.append(NewVariable(id=var.id, name=var.name[:_NAME_LIMIT], value=value))
        parts.append(f"{{{{input:{names[var]}}}}}")
    return SubmitCall(
        template="".join(parts),
        args=args,
        name=call.function_name[:_NAME_LIMIT],
        model=call.model,
        chat=call.chat,
        variables=new,
    )


def to_sampling(items: tuple[tuple[str, object], ...]) -> Sampling:
    """An output's sampling keywords (as `Piece.sampling` holds them) as a `Sampling`."""
    # The app's keyword values (`pa.Output` accepts any object) go on unchecked: the service
    # validates them, as the engines do embedded.
    kw: dict[str, Any] = dict(items)
    stop = kw.get("stop")
    if stop is not None and not isinstance(stop, str):
        kw["stop"] = list(stop)
    return Sampling(**kw)


def error_from_response(status: int, raw: bytes) -> ParrotError:
    """The typed exception of an error answer (a `ParrotError` naming the status when the body
    is not the service's JSON error)."""
    try:
        body = msgspec.json.decode(raw, type=ErrorResponse)
    except msgspec.MsgspecError:
        return ParrotError(f"HTTP {status}: {raw[:500].decode(errors='replace')}")
    return exception_from(body.error)
