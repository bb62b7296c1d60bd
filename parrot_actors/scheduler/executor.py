"""Running one semantic call on one engine with the paper's engine API.

A call with several outputs is one context: fill the text before output 1 (forking a shared
prefix context when the scheduler gives one), generate it, fill the next text, generate, and so
on (Parrot §6). Each output variable resolves the moment its
generation ends, so consumers of an early output start before the call finishes.
"""

from __future__ import annotations

import time

import msgspec

from parrot_actors.engines.api import EngineClient
from parrot_actors.errors import (
    CallError,
    EngineDiedError,
    EngineError,
    InvalidRequestError,
    ParrotError,
)
from parrot_actors.messages import (
    LATENCY_PRIORITY,
    THROUGHPUT_PRIORITY,
    GenerateResult,
    SamplingParams,
)
from parrot_actors.scheduler.prefixes import PrefixEntry
from parrot_actors.scheduler.tap import TokenTap
from parrot_actors.variables.graph import SemanticCall, get_perf_objective
from parrot_actors.variables.lifecycle import CallState, advance
from parrot_actors.variables.perf import LATENCY
from parrot_actors.variables.variable import Variable


class CallStats(msgspec.Struct, kw_only=True):
    """Timings of one call, in seconds: queueing (ready -> dispatched), time to first token,
    decode time, end-to-end (ready -> last output); and its engine and token counts."""

    call_id: int
    function: str
    engine: str = ""
    objective: str = ""
    queue_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def sampling_of(items: tuple[tuple[str, object], ...]) -> SamplingParams:
    """SamplingParams from an output's sampling keywords (one stop string becomes a tuple).
    Raises `InvalidRequestError` naming the keyword for a value of the wrong type."""
    kw = dict(items)
    if isinstance(kw.get("stop"), str):
        kw["stop"] = (kw["stop"],)
    try:
        return msgspec.convert(kw, SamplingParams)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"sampling: {exc}") from None


def priority_of(call: SemanticCall) -> int:
    """Engine priority from the call's deduced objective."""
    return LATENCY_PRIORITY if get_perf_objective(call) == LATENCY else THROUGHPUT_PRIORITY


async def _streamed(
    engine: EngineClient,
    context_id: str,
    sampling: SamplingParams,
    priority: int,
    tap: TokenTap,
    var: Variable,
) -> GenerateResult:
    """`generate` through `generate_stream`, each piece of text emitted to `var`'s listeners;
    the same `GenerateResult` (carried by the last delta)."""
    result = None
    async for delta in engine.generate_stream(context_id, sampling, priority=priority):
        if delta.text:
            tap.emit(var, delta.text)
        result = delta.result or result
    if result is None:
        raise EngineError(f"engine {engine.name!r} ended a stream without its result")
    return result


def first_segment(call: SemanticCall, engine: EngineClient) -> str:
    """The rendered prompt before the call's first output (chat-wrapped if the call asks).
    Raises `VariableError` if an input has no value yet."""
    buf = ""
    for piece in call.pieces:
        if piece.kind == "output":
            break
        buf += piece.text if piece.kind == "text" else piece.variable.value()
    return engine.chat_prompt(buf) if call.chat else buf


async def run_call(
    call: SemanticCall,
    engine: EngineClient,
    stats: CallStats,
    ready_at: float,
    context_id: str,
    prompt_ids: list[int],
    prefix: PrefixEntry | None = None,
    priority: int = LATENCY_PRIORITY,
    can_retry: bool = False,
    tap: TokenTap | None = None,
) -> None:
    """Run `call` on `engine` in context `context_id`, resolving its outputs in order.

    prompt_ids: the tokens of `first_segment(call)`. prefix: a prefix context whose tokens
    start `prompt_ids`; the call forks it and fills only the rest. tap: an output someone
    listens to is streamed, its text emitted piece by piece. On failure every unresolved
    output fails with `CallError` chained to the cause; the context is always freed. If the
    engine died (`EngineDiedError`) before any output resolved and `can_retry`, the call is
    left in state RETRY with its outputs untouched, for the scheduler to run elsewhere.
    """
    start = time.perf_counter()
    stats.queue_s = start - ready_at
    created = False
    buf = None
    try:
        for piece in call.pieces:
            if piece.kind != "output":
                if buf is not None:
                    buf += piece.text if piece.kind == "text" else piece.variable.value()
                continue
            if not created:
                if prefix is not None:
                    if prefix.ready is not None:
                        await prefix.ready
                    rest = prompt_ids[len(prefix.tokens) :]
                    await engine.fill(
                        context_id,
                        token_ids=rest or None,
                        parent_context_id=prefix.context_id,
                        priority=priority,
                    )
                else:
                    await engine.fill(context_id, token_ids=prompt_ids, priority=priority)
                created = True
            elif buf:
                await engine.fill(context_id, text=buf, priority=priority)
            buf = ""
            sampling = sampling_of(piece.sampling)
            if tap is not None and tap.listening(piece.variable):
                result = await _streamed(
                    engine, context_id, sampling, priority, tap, piece.variable
                )
            else:
                result = await engine.generate(context_id, sampling, priority=priority)
            if not stats.ttft_s:
                stats.ttft_s = time.perf_counter() - start
            stats.prompt_tokens = stats.prompt_tokens or result.prompt_tokens
            stats.completion_tokens += result.completion_tokens
            stats.decode_s += result.decode_s
            # Counted before the output resolves, so whoever it wakes sees the tokens.
            call.prompt_tokens, call.completion_tokens = (
                stats.prompt_tokens,
                stats.completion_tokens,
            )
            piece.variable.resolve(result.text)
        advance(call, CallState.DONE)
    except BaseException as exc:
        if (
            isinstance(exc, EngineDiedError)
            and can_retry
            and not any(o.done() for o in call.outputs)
        ):
            advance(call, CallState.RETRY)
            return
        advance(call, CallState.FAILED)
        cause = exc if isinstance(exc, ParrotError) else CallError(repr(exc))
        for out in call.outputs:
            if not out.done():
                err = CallError(f"{call.function_name}#{call.id} failed: {cause}")
                err.__cause__ = exc
                out.fail(err)
        if not isinstance(exc, Exception):
            raise
    finally:
        stats.e2e_s = time.perf_counter() - ready_at
        # Also when cancelled inside the first fill: the context may exist by now.
        try:
            await engine.free_context(context_id)
        except ParrotError:
            pass
