"""The lifecycle of a semantic call: its states and the only place they change.

    PENDING --inputs resolved and an output wanted--> READY --placed on an engine--> RUNNING
    RUNNING --every output resolved--> DONE
    RUNNING --its engine died before any output--> RETRY --queued again--> READY
    PENDING / READY / RUNNING / RETRY --an input failed, cancelled, refused--> FAILED
    PENDING --a remote mirror saw its outputs settle--> DONE

DONE and FAILED are final: a later transition is refused (returns False), which settles races
such as a cancel arriving while the executor finishes the call. Source of the states: Parrot
(OSDI 2024) §5, a call becomes runnable when its inputs resolve and it is wanted.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parrot_actors.variables.graph import SemanticCall


class CallState(str, Enum):
    """Where a call is in its lifecycle (see the module docstring)."""

    PENDING = "pending"
    READY = "ready"
    RUNNING = "running"
    RETRY = "retry"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


FINAL = frozenset({CallState.DONE, CallState.FAILED})
"""States a call never leaves."""

_ALLOWED: dict[CallState, frozenset[CallState]] = {
    CallState.PENDING: frozenset({CallState.READY, CallState.FAILED, CallState.DONE}),
    CallState.READY: frozenset({CallState.RUNNING, CallState.FAILED}),
    CallState.RUNNING: frozenset({CallState.DONE, CallState.RETRY, CallState.FAILED}),
    CallState.RETRY: frozenset({CallState.READY, CallState.FAILED}),
    CallState.DONE: frozenset(),
    CallState.FAILED: frozenset(),
}


def advance(call: SemanticCall, to: CallState) -> bool:
    """Move `call` to state `to`. Returns False, changing nothing, when the call is already
    final (DONE or FAILED); raises `ValueError` for a transition the lifecycle does not have
    (a bug in a runtime, never the user's input)."""
    if call.state in FINAL:
        return False
    if to not in _ALLOWED[call.state]:
        raise ValueError(f"{call!r}: no transition {call.state} -> {to}")
    call.state = to
    return True


def finished(call: SemanticCall) -> bool:
    """True once the call is DONE or FAILED."""
    return call.state in FINAL
