"""The application graph: semantic calls, their variables, and the paper's primitives.

Source: Parrot (Lin et al., OSDI 2024), §4.2 (primitives GetProducer, GetConsumers,
PrefixHash, GetPerfObj) and §5 (performance objective deduction, task groups).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from parrot_actors.errors import CallError
from parrot_actors.messages import GenerateResult
from parrot_actors.variables.lifecycle import CallState
from parrot_actors.variables.perf import GRAMMAR_KEYS, LATENCY, THROUGHPUT
from parrot_actors.variables.template import Text
from parrot_actors.variables.variable import Variable

if TYPE_CHECKING:
    from parrot_actors.variables.function import SemanticFunction

_call_ids = itertools.count()


@dataclass(frozen=True)
class Piece:
    """One piece of a call's prompt: constant text, an input variable, or an output variable
    with its sampling keywords."""

    kind: str  # "text" | "input" | "output"
    text: str = ""
    var: Variable | None = None
    sampling: tuple[tuple[str, object], ...] = ()

    @property
    def variable(self) -> Variable:
        """The variable of an input or output piece. Raises `ValueError` on a text piece."""
        if self.var is None:
            raise ValueError(f"a {self.kind} piece has no variable")
        return self.var


@dataclass(eq=False)
class SemanticCall:
    """One call of a semantic function: its prompt pieces and its variables.

    objective: None until some `get` downstream deduces it; task_group: id shared by the calls
    whose outputs all feed one consumer (a map stage), else None. wanted: some output has been
    asked for (or the runtime is eager), so the call runs once its inputs resolve.
    prompt_tokens / completion_tokens: what the call's run consumed and generated (tokens; set
    when it finishes; a session's own counters are their sums).

    For requests that arrive as one prompt (the OpenAI API): prompt_ids, the prompt as token
    ids (instead of tokenizing the text before the first output); program, the session the
    call belongs to (calls of one program are scheduled by the program's attained service);
    samples, how many generations are sampled from one fill of the prompt (`n`; one output
    only); retain_s, how long the context is kept for the program's next call (seconds; 0:
    freed at once). Set by the run: results, each output's (or sample's) `GenerateResult`;
    delivered, whether any token was streamed to a listener (then it is never re-run);
    cached_tokens, prompt tokens forked from the program's retained context.
    """

    function_name: str
    pieces: list[Piece]
    model: str | None = None
    chat: bool = False
    id: int = field(default_factory=lambda: next(_call_ids))
    objective: str | None = None
    task_group: int | None = None
    wanted: bool = False
    state: CallState = CallState.PENDING  # changed only by `lifecycle.advance`
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ids: tuple[int, ...] | None = None
    program: str | None = None
    samples: int = 1
    retain_s: float = 0.0
    results: list[GenerateResult] = field(default_factory=list)
    delivered: bool = False
    cached_tokens: int = 0

    @property
    def inputs(self) -> list[Variable]:
        """Input variables, in first-use order, without repeats."""
        return list(dict.fromkeys(p.variable for p in self.pieces if p.kind == "input"))

    @property
    def outputs(self) -> list[Variable]:
        """Output variables in template order."""
        return [p.variable for p in self.pieces if p.kind == "output"]

    def is_ready(self) -> bool:
        """Every input has resolved."""
        return all(v.done() for v in self.inputs)

    def __repr__(self) -> str:
        return f"SemanticCall({self.function_name}#{self.id}, {self.state})"


def build_pieces(
    fn: SemanticFunction, bound: dict[str, object], out_vars: dict[str, Variable]
) -> list[Piece]:
    """The call's pieces from the function's template and its bound arguments (inputs become
    Variables; plain parameters are rendered with str() and merged into the text)."""
    pieces: list[Piece] = []
    for p in fn.template.pieces:
        if isinstance(p, Text):
            _append_text(pieces, p.text)
        elif p.kind == "param":
            _append_text(pieces, str(bound[p.name]))
        elif p.kind == "input":
            value = bound[p.name]
            var = value if isinstance(value, Variable) else Variable(value, name=p.name)
            pieces.append(Piece("input", var=var))
        else:
            own = fn.output_sampling.get(p.name, {})
            defaults = fn.defaults
            if any(k in own for k in GRAMMAR_KEYS):  # an output's constraint replaces the default
                defaults = {k: v for k, v in defaults.items() if k not in GRAMMAR_KEYS}
            sampling = {**defaults, **own}
            pieces.append(
                Piece("output", var=out_vars[p.name], sampling=tuple(sorted(sampling.items())))
            )
    return pieces


def _append_text(pieces: list[Piece], text: str) -> None:
    if pieces and pieces[-1].kind == "text":
        pieces[-1] = Piece("text", text=pieces[-1].text + text)
    elif text:
        pieces.append(Piece("text", text=text))


def get_producer(var: Variable) -> SemanticCall | None:
    """The call that produces `var` (None for a variable the app sets)."""
    return var.producer


def get_consumers(var: Variable) -> list[SemanticCall]:
    """The calls that read `var`, in submission order."""
    return list(var.consumers)


def prefix_hash(call: SemanticCall) -> tuple[str | None, str | None]:
    """(static key, dynamic key) of the call's prompt prefix.

    static: a hash of the constant text before the first variable; equal across apps for equal
    text (system prompts). None if the prompt starts with a variable.
    dynamic: the constant text before the first input variable plus that variable's id, so
    calls that begin with the same variable (and the same text before it) share a key. None if
    no input variable precedes the first output.
    """
    static = None
    lead: list[str] = []
    dynamic = None
    for i, p in enumerate(call.pieces):
        if p.kind == "text":
            if i == 0 and p.text:
                static = _h("s:" + p.text)
            lead.append("t:" + p.text)
        elif p.kind == "input":
            lead.append("v:" + p.variable.id)
            dynamic = _h("d:" + "\x00".join(lead))
            break
        else:
            break
    return static, dynamic


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def get_perf_objective(call: SemanticCall) -> str:
    """The call's objective: a member of a task group (map stage) runs for THROUGHPUT (the group
    finishes when its last member does); otherwise the deduced objective, THROUGHPUT when
    nothing downstream asked for LATENCY."""
    if call.task_group is not None:
        return THROUGHPUT
    return call.objective or THROUGHPUT


def upstream(call: SemanticCall) -> list[SemanticCall]:
    """`call` and every call it transitively depends on (depth-first, each once)."""
    seen: dict[int, SemanticCall] = {}
    stack = [call]
    while stack:
        c = stack.pop()
        if c.id in seen:
            continue
        seen[c.id] = c
        stack.extend(v.producer for v in c.inputs if v.producer is not None)
    return list(seen.values())


def mark_objective(var: Variable, perf: str) -> list[SemanticCall]:
    """Objective deduction (paper §5.1): a `get(perf)` on `var` marks its producer and every
    call upstream with `perf` (LATENCY wins over THROUGHPUT) and as wanted. Returns the calls
    touched."""
    if var.producer is None:
        return []
    calls = upstream(var.producer)
    for c in calls:
        c.wanted = True
        if perf == LATENCY or c.objective is None:
            c.objective = perf if c.objective != LATENCY else LATENCY
    return calls


def assign_task_group(call: SemanticCall) -> None:
    """Task groups (paper §5.2): the producers of `call`'s inputs whose outputs all feed only
    `call` form a group (two or more of them), recorded on each member."""
    members = []
    for p in dict.fromkeys(v.producer for v in call.inputs if v.producer is not None):
        if all(c is call for o in p.outputs for c in o.consumers) and p.task_group is None:
            members.append(p)
    if len(members) >= 2:
        for m in members:
            m.task_group = call.id


def link(call: SemanticCall) -> None:
    """Put `call` into the graph: it becomes its outputs' producer and a consumer of its
    inputs. Raises `CallError` (changing nothing) as `check_acyclic` does."""
    check_acyclic(call)
    for v in call.outputs:
        v.producer = call
    for v in call.inputs:
        v.consumers.append(call)


def check_acyclic(call: SemanticCall) -> None:
    """Raise `CallError` if `call` would need its own output, directly or through others, or
    produce a variable that already has a value or a producer."""
    outs = {v.id for v in call.outputs}
    for v in call.outputs:
        if v.producer is not None and v.producer is not call:
            raise CallError(
                f"{call.function_name}: output {v.name!r} already has a producer "
                f"({v.producer.function_name}#{v.producer.id})"
            )
        if v.done():
            raise CallError(f"{call.function_name}: output {v.name!r} already has a value")
    stack = list(call.inputs)
    seen: set[str] = set()
    while stack:
        v = stack.pop()
        if v.id in outs:
            raise CallError(f"{call.function_name}: cycle: it needs its own output {v.name!r}")
        if v.id in seen:
            continue
        seen.add(v.id)
        if v.producer is not None:
            stack.extend(v.producer.inputs)
