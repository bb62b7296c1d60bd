"""The runtime: owns the application graph and the actors (engines and the scheduler).

`async with pa.Runtime(...) as rt:` starts the actors and makes the runtime current (a
contextvar), so calling a semantic function submits to it. Variables notify the runtime when
they resolve, fail, or are asked for; the runtime moves calls to the scheduler the moment they
are ready and wanted. Nothing polls and nothing waits on the client (Parrot §5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import msgspec

from parrot_actors.engines.api import EngineClient
from parrot_actors.engines.engine import Engine, EngineConfig
from parrot_actors.errors import CallError, InvalidRequestError, TemplateError
from parrot_actors.messages import EngineStats
from parrot_actors.scheduler import Scheduler, SchedulerConfig
from parrot_actors.scheduler.executor import CallStats
from parrot_actors.scheduler.tap import TokenTap
from parrot_actors.variables.current import CurrentRuntime
from parrot_actors.variables.graph import (
    SemanticCall,
    assign_task_group,
    link,
    mark_objective,
)
from parrot_actors.variables.lifecycle import CallState, advance, finished
from parrot_actors.variables.variable import Variable

if TYPE_CHECKING:
    from parrot_actors.ray.client import RayRuntime
    from parrot_actors.server.client import RemoteRuntime


def with_scheduler_caching(spec: EngineConfig, scheduler: SchedulerConfig) -> EngineConfig:
    """`spec` with the scheduler's `automatic_prefix_caching` applied where the engine left
    `prefix_caching` unset. Raises `InvalidRequestError` when both are set and disagree (one
    must not silently override the other)."""
    wanted = scheduler.automatic_prefix_caching
    if wanted is None or spec.prefix_caching == wanted:
        return spec
    if spec.prefix_caching is None:
        return msgspec.structs.replace(spec, prefix_caching=wanted)
    raise InvalidRequestError(
        f"engine {spec.name!r} sets prefix_caching={spec.prefix_caching} but the scheduler "
        f"sets automatic_prefix_caching={wanted}: set one of them, or both alike"
    )


class RuntimeStats(msgspec.Struct, kw_only=True):
    """Totals over all engines (tokens) and calls, plus each engine's own counters."""

    prefill_tokens: int
    reused_tokens: int
    generated_tokens: int
    calls_completed: int
    calls_failed: int
    engines: dict[str, EngineStats]


class Runtime(CurrentRuntime):
    """The embedded runtime: local engine actors and a scheduler actor in this process.

    model: the model of the default engine ("default" = embedded SmolLM2) when `engines` is
    not given. engines: `EngineConfig`s (or ready engine objects with the engine API, e.g. a
    test's `EchoEngine`). scheduler: `SchedulerConfig`. eager: run calls as soon as their
    inputs are ready even if nobody asked for their outputs (default: lazy, as in the paper).
    """

    def __init__(
        self,
        model: str = "default",
        engines: Sequence[EngineConfig | EngineClient] | None = None,
        scheduler: SchedulerConfig | None = None,
        eager: bool = False,
    ) -> None:
        self.engine_specs: list[EngineConfig | EngineClient] = (
            list(engines) if engines else [EngineConfig(model=model)]
        )
        self.scheduler_config = (scheduler or SchedulerConfig()).validate()
        self.eager = eager
        self.engines: list[EngineClient] = []
        self.scheduler: Scheduler | None = None
        self.calls: dict[int, SemanticCall] = {}  # submitted and not finished
        self.calls_completed = 0
        self.calls_failed = 0
        self._owned: list[EngineClient] = []

    connect: ClassVar[Callable[..., RemoteRuntime]]
    """`pa.Runtime.connect(url, ...)`: `pa.connect` (a `RemoteRuntime`; wired by the package
    root, so this module imports no client)."""
    ray: ClassVar[Callable[..., RayRuntime]]
    """`pa.Runtime.ray(address, ...)`: `pa.ray` (a `RayRuntime`)."""

    async def start(self) -> None:
        """Start the engines (loading models) and the scheduler."""
        names: set[str] = set()
        for i, spec in enumerate(self.engine_specs):
            if isinstance(spec, EngineConfig):
                if spec.name == "engine0" and i:
                    spec = msgspec.structs.replace(spec, name=f"engine{i}")
                spec = with_scheduler_caching(spec, self.scheduler_config)
                engine: EngineClient = await Engine.start(spec)
                self._owned.append(engine)
            else:
                engine = spec
            if engine.name in names:
                raise TemplateError(f"two engines are named {engine.name!r}; names must differ")
            names.add(engine.name)
            self.engines.append(engine)
        self.scheduler = Scheduler(self.engines, self.scheduler_config)
        self.scheduler.on_call_end.append(self._call_ended)

    def _started(self) -> Scheduler:
        if self.scheduler is None:
            raise TemplateError("the runtime is not started: use `async with pa.Runtime(...)`")
        return self.scheduler

    @property
    def tap(self) -> TokenTap:
        """Listeners of outputs being generated (see `TokenTap`): the service streams a
        variable by listening here. Raises `TemplateError` before `start`."""
        return self._started().tap

    async def flush(self) -> None:
        """Wait until every engine applied everything sent to it so far (the frees of
        cancelled calls included)."""
        await asyncio.gather(*(e.flush() for e in self.engines))

    async def close(self) -> None:
        """Cancel what runs and stop the engines this runtime started."""
        if self.scheduler is not None:
            await self.scheduler.close()
        for engine in self._owned:
            await engine.close()
        self._owned.clear()

    # ---- the graph --------------------------------------------------------------------------

    def admit(self, call: SemanticCall, tenant: str = "default") -> None:
        """Check, before `submit`, that the service can take `call` for `tenant` within its
        bounds (`Scheduler.admit`). Raises `OverloadedError` (HTTP 429) when it cannot."""
        self._started().admit(call, tenant)

    def submit(self, call: SemanticCall) -> None:
        """Add a call to the graph; it runs once its inputs resolve and an output is wanted.
        Raises `CallError` for a cycle or an output that already has a producer or value."""
        link(call)
        for v in call.inputs + call.outputs:
            if not v.owned_by(self):
                v.attach(self)
        self.calls[call.id] = call
        self._started().register(call)
        assign_task_group(call)
        failed = [v for v in call.inputs if v.done() and v.error is not None]
        if failed:
            self._fail_call(call, failed[0])
            return
        if self.eager or any(v.awaited for v in call.outputs):
            call.wanted = True
        self._maybe_ready(call)

    def _call_ended(self, call: SemanticCall) -> None:
        # Finished calls leave the table so a long-running service does not grow without bound;
        # the graph stays reachable through the variables the app still holds.
        if self.calls.pop(call.id, None) is not None and call.state is not CallState.DONE:
            self.calls_failed += 1

    def _maybe_ready(self, call: SemanticCall) -> None:
        if call.state is CallState.PENDING and call.wanted and call.is_ready():
            advance(call, CallState.READY)
            self._started().enqueue(call)

    def _fail_call(self, call: SemanticCall, cause_var: Variable) -> None:
        if not advance(call, CallState.FAILED):
            return
        self._started().cancel(call)
        for out in call.outputs:
            err = CallError(f"{call.function_name}#{call.id}: input {cause_var.name!r} failed")
            err.__cause__ = cause_var.error
            out.fail(err)

    # ---- what variables report (`VariableOwner`) ---------------------------------------------

    def on_demand(self, var: Variable, perf: str) -> None:
        """Someone awaits `var`: its producer and everything upstream are wanted with `perf`."""
        for call in mark_objective(var, perf):
            self._maybe_ready(call)

    def on_settled(self, var: Variable) -> None:
        """`var` resolved or failed: its consumers become ready, or fail with it."""
        call = var.producer
        if call is not None and self.scheduler is not None and var.error is None:
            self.scheduler.event_log.append(("resolved", call.id, var.name))
            if all(o.done() and o.error is None for o in call.outputs):
                self.calls_completed += 1  # counted when the app can see it, not at cleanup
        for call in var.consumers:
            if var.error is not None:
                self._fail_call(call, var)
            else:
                self._maybe_ready(call)

    def on_cancel(self, var: Variable) -> None:
        """The app cancelled `var`: its producer stops and its outputs fail."""
        call = var.producer
        if call is None or finished(call):
            return
        advance(call, CallState.FAILED)
        self._started().cancel(call)
        for out in call.outputs:
            out.fail(CallError(f"{call.function_name}#{call.id} was cancelled"))

    # ---- introspection ---------------------------------------------------------------------

    def call_stats(self) -> list[CallStats]:
        """Per finished call: queueing time, time to first token, decode time and end-to-end
        latency in seconds, engine, objective and token counts (`CallStats`), in finish order."""
        return list(self.scheduler.call_stats) if self.scheduler else []

    def stats(self) -> RuntimeStats:
        """Token and call counters over all engines (see `RuntimeStats`)."""
        per = {e.name: e.stats() for e in self.engines}
        return RuntimeStats(
            prefill_tokens=sum(s.prefill_tokens for s in per.values()),
            reused_tokens=sum(s.reused_tokens for s in per.values()),
            generated_tokens=sum(s.generated_tokens for s in per.values()),
            calls_completed=self.calls_completed,
            calls_failed=self.calls_failed,
            engines=per,
        )


async def gather(*variables: Variable, perf: str = "latency") -> list[str]:
    """Await several variables with one objective; returns their values in order (raises the
    first `CallError`)."""
    return list(await asyncio.gather(*(v.get(perf=perf) for v in variables)))
