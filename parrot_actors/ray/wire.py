"""Messages between `RayRuntime` clients, the service actor and the engine actors.

msgspec structs (Ray pickles them as they are). Errors cross as `ErrorInfo`: the chain of
(type name, message) pairs, rebuilt on the other side as the same typed `ParrotError`s.
"""

from __future__ import annotations

from typing import Any

import msgspec

from parrot_actors import errors
from parrot_actors.errors import CallError, ParrotError
from parrot_actors.messages import EngineStats
from parrot_actors.variables.graph import SemanticCall


class PieceMsg(msgspec.Struct, frozen=True, kw_only=True):
    """One piece of a call's prompt. kind: "text" | "input" | "output". var/name: the client
    variable's id and name. value: an input's value when the client set it (sent once).
    sampling: an output's sampling keywords as `Piece.sampling` holds them."""

    kind: str
    text: str = ""
    var: str = ""
    name: str = ""
    value: str | None = None
    sampling: tuple[tuple[str, Any], ...] = ()


class CallMsg(msgspec.Struct, frozen=True, kw_only=True):
    """A semantic call as a client submits it; `call_id` is the client's call id."""

    call_id: int
    function: str
    pieces: list[PieceMsg]
    model: str | None = None
    chat: bool = False


class SubmitOp(msgspec.Struct, frozen=True, tag="submit"):
    """Add a call to the session's graph."""

    call: CallMsg


class SetOp(msgspec.Struct, frozen=True, tag="set"):
    """Give a client-set variable (known to the service) its value."""

    var: str
    value: str


class CancelOp(msgspec.Struct, frozen=True, tag="cancel"):
    """Cancel a variable (its producer stops; everything downstream fails)."""

    var: str


Op = SubmitOp | SetOp | CancelOp


class ErrorInfo(msgspec.Struct, frozen=True):
    """An exception and its causes, outermost first: (type name, message) pairs."""

    chain: list[tuple[str, str]]


class VarState(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a wait: the value or the error, plus the values of upstream variables of
    the session that have resolved (id -> value), so `value()` works on them client-side."""

    value: str | None = None
    error: ErrorInfo | None = None
    resolved: dict[str, str] = {}


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a proxy learns from an engine actor. incarnation: a new id after each restart
    (a restarted actor holds no contexts). group: its placement group's id (hex)."""

    name: str
    model_name: str
    aliases: tuple[str, ...]
    incarnation: str
    group: str = ""
    stats: EngineStats


def encode_call(call: SemanticCall, sent: set[str]) -> CallMsg:
    """The wire form of `call`. Values of client-set inputs go with the first call that uses
    them; their ids are added to `sent`."""
    pieces = []
    for p in call.pieces:
        if p.kind == "text":
            pieces.append(PieceMsg(kind="text", text=p.text))
            continue
        var = p.var
        value = None
        if p.kind == "input" and var.producer is None and var.done() and var.id not in sent:
            value = var.value()
            sent.add(var.id)
        pieces.append(
            PieceMsg(kind=p.kind, var=var.id, name=var.name, value=value, sampling=p.sampling)
        )
    return CallMsg(
        call_id=call.id,
        function=call.function_name,
        pieces=pieces,
        model=call.model,
        chat=call.chat,
    )


def encode_error(exc: BaseException, depth: int = 8) -> ErrorInfo:
    """`exc` and up to `depth` - 1 of its causes (`__cause__`) as an `ErrorInfo`."""
    chain: list[tuple[str, str]] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < depth:
        chain.append((type(cur).__name__, str(cur)))
        cur = cur.__cause__
    return ErrorInfo(chain=chain)


def decode_error(info: ErrorInfo) -> ParrotError:
    """The typed exception chain of `info`: each link is the `parrot_actors.errors` class of
    that name (a plain `ParrotError` naming the type for anything else)."""
    exc: BaseException | None = None
    for name, message in reversed(info.chain):
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, ParrotError)):
            cls, message = ParrotError, f"{name}: {message}"
        new = cls(message)
        new.__cause__ = exc
        exc = new
    if not isinstance(exc, ParrotError):
        return CallError("unknown error")
    return exc


class EngineStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A proxy's view of its engine actor: healthy (False while Ray restarts it), the current
    incarnation, restarts seen and contexts refilled after restarts."""

    name: str
    healthy: bool
    incarnation: str
    restarts: int
    replays: int


class OpResult(msgspec.Struct, frozen=True):
    """An engine actor's answer: the operation's result, the actor's incarnation and the
    engine's stats after the operation."""

    value: Any
    incarnation: str
    stats: EngineStats
