"""Running one semantic call on one engine with the paper's engine API.

A call with several outputs is one context: fill the text before output 1 (forking a shared
prefix context when the scheduler gives one), generate it, fill the next text, generate, and so
on (Parrot §6). Each output variable resolves the moment its
generation ends, so consumers of an early output start before the call finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from parrot_actors import clock
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
    FillResult,
    GenerateResult,
    SamplingParams,
)
from parrot_actors.scheduler.tap import TokenTap
from parrot_actors.variables.graph import SemanticCall, get_perf_objective
from parrot_actors.variables.lifecycle import CallState, advance
from parrot_actors.variables.perf import GRAMMAR_KEYS, LATENCY
from parrot_actors.variables.variable import Variable


class CallStats(msgspec.Struct, kw_only=True):
    """Timings of one call, in seconds: queueing (ready -> dispatched), time to first token,
    decode time, end-to-end (ready -> last output); its engine; and token counts: prompt
    (before its first output), completion (all outputs and samples), and of the prompt tokens
    its fills appended, those computed and those reused (forked or cached); its program."""

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
    computed_tokens: int = 0
    reused_tokens: int = 0
    program: str | None = None


class ProgramStats(msgspec.Struct, kw_only=True):
    """What one program (a session) has been served over its finished calls: calls, prompt
    and completion tokens, prompt tokens computed and reused, and of those reused, the ones
    forked from its own retained context (`cached_tokens`); `service_s`, the predicted engine
    seconds of its calls (`policy.service_s`), is its attained service."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    computed_tokens: int = 0
    reused_tokens: int = 0
    cached_tokens: int = 0
    service_s: float = 0.0

    @property
    def attained_tokens(self) -> int:
        """Tokens served (prompt and completion)."""
        return self.prompt_tokens + self.completion_tokens

    def add(self, call: CallStats, cached_tokens: int, seconds: float = 0.0) -> None:
        """Count one finished call (or attempt) that cost `seconds` of predicted engine time."""
        self.calls += 1
        self.service_s += seconds
        self.prompt_tokens += call.prompt_tokens
        self.completion_tokens += call.completion_tokens
        self.computed_tokens += call.computed_tokens
        self.reused_tokens += call.reused_tokens
        self.cached_tokens += cached_tokens


def sampling_of(items: tuple[tuple[str, object], ...]) -> SamplingParams:
    """SamplingParams from an output's sampling keywords (one stop string becomes a tuple).
    Raises `InvalidRequestError` naming the keyword for a value of the wrong type."""
    kw = dict(items)
    if isinstance(kw.get("stop"), str):
        kw["stop"] = (kw["stop"],)
    popped = {k: kw.pop(k, None) for k in GRAMMAR_KEYS}
    constraint = {k: v for k, v in popped.items() if v is not None}
    if constraint:
        kw["grammar"] = constraint
    try:
        return msgspec.convert(kw, SamplingParams)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"sampling: {exc}") from None


def priority_of(call: SemanticCall) -> int:
    """Engine priority from the call's deduced objective."""
    return LATENCY_PRIORITY if get_perf_objective(call) == LATENCY else THROUGHPUT_PRIORITY


@dataclass(frozen=True)
class ForkFrom:
    """A context a call forks instead of computing its prompt's first `tokens` tokens: a
    prefix context (filled by `ready`, awaited first) or its program's retained context."""

    context_id: str
    tokens: int
    ready: asyncio.Future[FillResult] | None = None


async def _generate(
    engine: EngineClient,
    context_id: str,
    sampling: SamplingParams,
    priority: int,
    call: SemanticCall,
    var: Variable,
    tap: TokenTap | None,
    index: int,
) -> GenerateResult:
    """One generation; streamed when someone listens to `var`, each `TokenDelta` emitted with
    the choice `index` (and the call marked as having delivered output)."""
    if tap is None or not tap.listening(var):
        return await engine.generate(context_id, sampling, priority=priority)
    result = None
    async for delta in engine.generate_stream(context_id, sampling, priority=priority):
        call.delivered = True
        tap.emit(var, delta, index)
        result = delta.result or result
    if result is None:
        raise EngineError(f"engine {engine.name!r} ended a stream without its result")
    return result


async def _samples(
    engine: EngineClient,
    context_id: str,
    sampling: SamplingParams,
    priority: int,
    call: SemanticCall,
    var: Variable,
    tap: TokenTap | None,
    stats: CallStats,
) -> list[GenerateResult]:
    """`call.samples` generations from the one filled prompt of `context_id`: the first on it,
    the others on forks of it (created before anything is generated, so each holds just the
    prompt; their tokens count as reused in `stats`), with seeds `seed + i` when a seed is
    given. The forks are freed at the end."""
    n = call.samples
    children = [f"{context_id}/{i}" for i in range(1, n)]
    try:
        for child in children:
            fill = await engine.fill(child, parent_context_id=context_id, priority=priority)
            stats.computed_tokens += fill.computed_tokens
            stats.reused_tokens += fill.reused_tokens

        def seeded(i: int) -> SamplingParams:
            seed = None if sampling.seed is None else sampling.seed + i
            return msgspec.structs.replace(sampling, seed=seed)

        ctxs = [context_id, *children]
        return list(
            await asyncio.gather(
                *(
                    _generate(engine, c, seeded(i), priority, call, var, tap, i)
                    for i, c in enumerate(ctxs)
                )
            )
        )
    finally:
        for child in children:
            with contextlib.suppress(ParrotError):
                await engine.free_context(child)


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
    fork: ForkFrom | None = None,
    priority: int = LATENCY_PRIORITY,
    can_retry: bool = False,
    tap: TokenTap | None = None,
    retain: Callable[[SemanticCall, str, list[int]], bool] | None = None,
) -> None:
    """Run `call` on `engine` in context `context_id`, resolving its outputs in order.

    prompt_ids: the tokens of `first_segment(call)` (or `call.prompt_ids`). fork: a context
    whose first `fork.tokens` tokens start `prompt_ids`; the call forks it and fills only the
    rest. tap: an output someone listens to is streamed, its deltas emitted. `call.samples`
    > 1 samples that many generations of the one output from one prompt fill (`_samples`).
    Each output's (or sample's) `GenerateResult` lands in `call.results`. retain: offered the
    finished context of a single-output call of a program with `retain_s` (with its token
    ids); if it takes it, the context is not freed. On failure every unresolved output fails
    with `CallError` chained to the cause and the context is freed. If the engine died
    (`EngineDiedError`) before any output resolved or streamed and `can_retry`, the call is
    left in state RETRY with its outputs untouched, for the scheduler to run elsewhere.
    """
    start = clock.now()
    stats.queue_s = start - ready_at
    created = False
    retained = False
    buf = None
    call.results = []
    try:
        for piece in call.pieces:
            if piece.kind != "output":
                if buf is not None:
                    buf += piece.text if piece.kind == "text" else piece.variable.value()
                continue
            if not created:
                if fork is not None:
                    if fork.ready is not None:
                        await fork.ready
                    rest = prompt_ids[fork.tokens :]
                    fill = await engine.fill(
                        context_id,
                        token_ids=rest or None,
                        parent_context_id=fork.context_id,
                        priority=priority,
                        parent_tokens=fork.tokens,
                    )
                else:
                    fill = await engine.fill(context_id, token_ids=prompt_ids, priority=priority)
                created = True
                stats.computed_tokens += fill.computed_tokens
                stats.reused_tokens += fill.reused_tokens
            elif buf:
                fill = await engine.fill(context_id, text=buf, priority=priority)
                stats.computed_tokens += fill.computed_tokens
                stats.reused_tokens += fill.reused_tokens
            buf = ""
            sampling = sampling_of(piece.sampling)
            var = piece.variable
            if call.samples > 1:
                results = await _samples(
                    engine, context_id, sampling, priority, call, var, tap, stats
                )
            else:
                results = [
                    await _generate(engine, context_id, sampling, priority, call, var, tap, 0)
                ]
            result = results[0]
            call.results += results
            if not stats.ttft_s:
                stats.ttft_s = clock.now() - start
            stats.prompt_tokens = stats.prompt_tokens or result.prompt_tokens
            stats.completion_tokens += sum(r.completion_tokens for r in results)
            stats.decode_s += result.decode_s
            # Counted before the output resolves, so whoever it wakes sees the tokens.
            call.prompt_tokens, call.completion_tokens = (
                stats.prompt_tokens,
                stats.completion_tokens,
            )
            var.resolve(result.text)
        advance(call, CallState.DONE)
        if retain is not None and call.retain_s > 0 and len(call.results) == call.samples:
            last = call.results[0]
            tokens = (list(prompt_ids) + last.token_ids)[: last.context_len]
            retained = retain(call, context_id, tokens)
    except BaseException as exc:
        if (
            isinstance(exc, EngineDiedError)
            and can_retry
            and not call.delivered
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
        stats.e2e_s = clock.now() - ready_at
        if not retained:
            # Also when cancelled inside the first fill: the context may exist by now.
            with contextlib.suppress(ParrotError):
                await engine.free_context(context_id)
