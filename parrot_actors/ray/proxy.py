"""`RayEngine`: a local stand-in with the engine API for one engine actor.

The scheduler uses it exactly like a local `Engine`: `tokenize`/`chat_prompt`/`stats` answer
locally (the tokenizer is fetched once from the actor; stats are cached from every answer and
refreshed by a light monitor), `fill`/`generate`/`free_context` are actor calls.

Faults (Ray docs, "Fault Tolerance: Actors"): a lost actor raises `RayActorError` (its
subclasses `ActorDiedError`, `ActorUnavailableError`) in every call in flight; the proxy turns
that into `EngineDiedError` (the scheduler retries the call elsewhere when allowed), sets
`healthy = False` so the scheduler gives it no new work, and probes with `ping` until Ray has
restarted the actor (`max_restarts`), then rejoins. A restarted actor holds no contexts: each
context is recorded with the incarnation that holds it; a context from an older incarnation
that was only filled (a prefix context) is refilled transparently when next used, any other
raises `EngineDiedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import msgspec
import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from parrot_actors.engines.api import EngineClient, Tokenizer, TokenizerMethods
from parrot_actors.errors import ContextNotFoundError, EngineDiedError, EngineError, ParrotError
from parrot_actors.messages import (
    LATENCY_PRIORITY,
    EngineStats,
    FillResult,
    GenerateResult,
    SamplingParams,
    TokenDelta,
)
from parrot_actors.ray.wire import EngineInfo, EngineStatus, OpResult

if TYPE_CHECKING:
    from parrot_actors.ray.engine_actor import EngineActor  # imports the engine (torch)

_T = TypeVar("_T")


@dataclass
class _Ctx:
    """A live context: the incarnation holding it, and how to rebuild it (fork parent and
    fills) while it has only been filled."""

    incarnation: str
    parent: str | None
    parent_tokens: int | None = None
    fills: list[tuple[list[int] | None, str | None]] = field(default_factory=list)
    replayable: bool = True


class RayEngine(TokenizerMethods):
    """The engine API over the engine actor `handle` (see the module docstring).

    Build with `await RayEngine.connect(handle)`. Attributes: `name`, `model_name`, `aliases`,
    `tokenizer`, `healthy` (False while the actor is lost or restarting), `incarnation`,
    `restarts` (restarts seen), `replays` (contexts refilled after a restart).
    monitor_interval_s: seconds between stats refreshes (which also notice an idle actor's
    death) once `start_monitor()` ran. probe_interval_s: first delay between health probes of a
    lost actor (doubling to 5 s); probe_timeout_s: seconds one probe may take (a restarted
    actor reloads its model first). Errors: the engine's own
    (`ContextNotFoundError`, `InvalidRequestError`, `CapacityError`), `EngineDiedError` when
    the actor is lost or a context died with it, `EngineError` for anything else.
    """

    def __init__(
        self,
        handle: ActorHandle[EngineActor],
        info: EngineInfo,
        tokenizer: Tokenizer,
        monitor_interval_s: float = 1.0,
        probe_interval_s: float = 0.25,
        probe_timeout_s: float = 300.0,
    ) -> None:
        self.handle = handle
        self.name = info.name
        self.model_name = info.model_name
        self.aliases = tuple(info.aliases)
        self.tokenizer = tokenizer
        self.healthy = True
        self.incarnation = info.incarnation
        self.restarts = 0
        self.replays = 0
        self.monitor_interval_s = monitor_interval_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._stats = info.stats
        # Context ids are namespaced per proxy: several schedulers (the service, an HTTP
        # server) may share one engine actor, and each numbers its contexts from 0.
        self._tag = uuid.uuid4().hex[:8]
        self._ctx: dict[str, _Ctx] = {}
        self._replays: dict[str, asyncio.Future[None]] = {}
        self._listeners: list[Callable[[EngineClient], None]] = []
        self._recovery: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, handle: ActorHandle[EngineActor], **kwargs: float) -> RayEngine:
        """A proxy for the actor `handle`, once its engine is built (seconds: model load).
        Raises the engine's build error (`EngineError`, `CapacityError`) or `EngineDiedError`."""
        with _translated(f"engine actor {handle}"):
            info: EngineInfo = await handle.info.remote()
            tokenizer: Tokenizer = await handle.tokenizer.remote()
        return cls(handle, info, tokenizer, **kwargs)

    def __repr__(self) -> str:
        return f"RayEngine({self.name!r}, healthy={self.healthy}, incarnation={self.incarnation})"

    # ---- local answers ------------------------------------------------------------------

    def step_model(self) -> None:
        """None: the model lives in the actor's process (the scheduler prices tokens)."""
        return None

    def stats(self) -> EngineStats:
        """The engine's counters as of the last answer or refresh (a copy); `healthy` is False
        while the actor is lost as well as while its engine rebuilds itself."""
        return msgspec.structs.replace(self._stats, healthy=self.healthy and self._stats.healthy)

    async def flush(self) -> None:
        """Nothing to wait for here: each operation is one actor call, applied by the actor's
        engine before it answers."""

    def status(self) -> EngineStatus:
        """Health, incarnation and fault counters."""
        return EngineStatus(
            name=self.name,
            healthy=self.healthy,
            incarnation=self.incarnation,
            restarts=self.restarts,
            replays=self.replays,
        )

    def add_listener(self, fn: Callable[[EngineClient], None]) -> None:
        """Call `fn(self)` whenever `healthy` changes (e.g. to dispatch on rejoin)."""
        self._listeners.append(fn)

    # ---- the engine API -----------------------------------------------------------------

    async def fill(
        self,
        context_id: str,
        token_ids: list[int] | None = None,
        text: str | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
        parent_tokens: int | None = None,
    ) -> FillResult:
        """`Engine.fill` on the actor (see the class docstring for errors)."""
        self._check()
        out = await self._run(
            [context_id, parent_context_id],
            lambda: self.handle.call.remote(
                "fill",
                self._rid(context_id),
                token_ids,
                text,
                self._rid(parent_context_id),
                priority,
                parent_tokens,
            ),
        )
        rec = self._ctx.get(context_id)
        if rec is None or rec.incarnation != out.incarnation:
            rec = self._ctx[context_id] = _Ctx(out.incarnation, parent_context_id, parent_tokens)
        rec.fills.append((token_ids, text))
        result: FillResult = out.value
        return result

    async def generate(
        self,
        context_id: str,
        sampling: SamplingParams | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
    ) -> GenerateResult:
        """`Engine.generate` on the actor."""
        self._check()
        out = await self._run(
            [context_id, parent_context_id],
            lambda: self.handle.call.remote(
                "generate", self._rid(context_id), sampling, self._rid(parent_context_id), priority
            ),
        )
        self._generated(context_id, parent_context_id, out.incarnation)
        result: GenerateResult = out.value
        return result

    async def generate_stream(
        self,
        context_id: str,
        sampling: SamplingParams | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
    ) -> AsyncIterator[TokenDelta]:
        """`Engine.generate_stream` on the actor (a Ray streaming generator; closing the
        iterator early cancels it)."""
        self._check()
        await self._current([context_id, parent_context_id])
        gen = self.handle.stream.options(num_returns="streaming").remote(
            self._rid(context_id), sampling, self._rid(parent_context_id), priority
        )
        finished = False
        try:
            with self._errors():
                async for ref in gen:
                    yield await ref
            finished = True
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    ray.cancel(gen)
            self._generated(context_id, parent_context_id, self.incarnation)

    async def free_context(self, context_id: str) -> None:
        """`Engine.free_context` on the actor. A context that died with an earlier incarnation
        is just forgotten. Raises `ContextNotFoundError` for a context never created."""
        rec = self._ctx.pop(context_id, None)
        if rec is not None and (rec.incarnation != self.incarnation or not self.healthy):
            return
        try:
            with self._errors():
                out = await self.handle.call.remote("free_context", self._rid(context_id))
            self._observe(out)
        except (ContextNotFoundError, EngineDiedError):
            if rec is None:
                raise

    async def close(self) -> None:
        """Stop the monitor and any health probe (the actor itself lives on)."""
        for task in (self._monitor, self._recovery):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    # ---- health -------------------------------------------------------------------------

    def start_monitor(self) -> None:
        """Refresh stats every `monitor_interval_s` (noticing an idle actor's death)."""
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())

    async def refresh(self) -> EngineStats:
        """Fetch the current stats now (cached stats when the actor is lost)."""
        if self.healthy:
            with contextlib.suppress(ParrotError):
                with self._errors():
                    self._observe(await self.handle.stats.remote())
        return self.stats()

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.monitor_interval_s)
            await self.refresh()

    def _lost(self) -> None:
        if self.healthy:
            self.healthy = False
            self._notify()
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        delay = self.probe_interval_s
        while True:
            await asyncio.sleep(delay)
            try:
                ping = self.handle.ping.remote()
                incarnation: str = await asyncio.wait_for(_awaited(ping), self.probe_timeout_s)
                break
            except (RayActorError, RayTaskError, GetTimeoutError, asyncio.TimeoutError):
                delay = min(delay * 2, 5.0)
        self._switch(incarnation)
        self.healthy = True
        await self.refresh()
        self._notify()

    def _notify(self) -> None:
        for fn in list(self._listeners):
            fn(self)

    def _check(self) -> None:
        if not self.healthy:
            raise EngineDiedError(f"engine {self.name!r} is lost (Ray is restarting it)")

    # ---- incarnations and replay --------------------------------------------------------

    def _rid(self, context_id: str | None) -> str | None:
        return None if context_id is None else f"{self._tag}/{context_id}"

    def _observe(self, out: OpResult) -> None:
        self._switch(out.incarnation)
        self._stats = out.stats

    def _switch(self, incarnation: str) -> None:
        if incarnation != self.incarnation:
            self.incarnation = incarnation
            self.restarts += 1

    def _generated(self, context_id: str, parent: str | None, incarnation: str) -> None:
        rec = self._ctx.get(context_id)
        if rec is None or rec.incarnation != incarnation:
            rec = self._ctx[context_id] = _Ctx(incarnation, parent)
        rec.replayable = False  # generated tokens are not recorded

    async def _run(
        self, contexts: list[str | None], make: Callable[[], Awaitable[OpResult]]
    ) -> OpResult:
        """Run the actor call `make()` once `contexts` are live on the current incarnation;
        when it finds a recorded context missing, check for a restart and try once more."""
        for attempt in range(2):
            await self._current(contexts)
            try:
                with self._errors():
                    out = await make()
            except ContextNotFoundError:
                known = any(c in self._ctx for c in contexts if c is not None)
                if attempt or not known or not await self._restarted():
                    raise
                continue
            self._observe(out)
            return out
        raise AssertionError("unreachable")

    async def _restarted(self) -> bool:
        with self._errors():
            incarnation: str = await self.handle.ping.remote()
        before = self.incarnation
        self._switch(incarnation)
        return incarnation != before

    async def _current(self, contexts: list[str | None]) -> None:
        for c in contexts:
            if c is not None:
                await self._ensure(c)

    async def _ensure(self, context_id: str) -> None:
        rec = self._ctx.get(context_id)
        if rec is None or rec.incarnation == self.incarnation:
            return
        if not rec.replayable:
            self._ctx.pop(context_id, None)
            raise EngineDiedError(
                f"context {context_id!r} was lost when engine {self.name!r} restarted"
            )
        pending = self._replays.get(context_id)
        if pending is not None:
            await asyncio.shield(pending)
            return
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._replays[context_id] = fut
        try:
            await self._replay(context_id, rec)
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            self._replays.pop(context_id, None)

    async def _replay(self, context_id: str, rec: _Ctx) -> None:
        self.replays += 1
        if rec.parent is not None:
            await self._ensure(rec.parent)
        out: OpResult | None = None
        for i, (ids, text) in enumerate(rec.fills):
            parent = self._rid(rec.parent) if i == 0 else None
            cut = rec.parent_tokens if i == 0 else None
            with self._errors():
                out = await self.handle.call.remote(
                    "fill", self._rid(context_id), ids, text, parent, LATENCY_PRIORITY, cut
                )
            self._observe(out)
        rec.incarnation = out.incarnation if out is not None else self.incarnation

    # ---- streaming and errors -----------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate Ray's errors: the engine's own error comes out as it was raised; a lost
        actor becomes `EngineDiedError` (and starts the health probe)."""
        try:
            yield
        except RayActorError as exc:
            self._lost()
            raise EngineDiedError(f"engine {self.name!r} died: {type(exc).__name__}") from exc
        except RayTaskError as exc:
            raise _cause(exc, self.name) from None
        except RayError as exc:  # e.g. a cancelled task or a lost object
            raise EngineError(f"engine {self.name!r}: {type(exc).__name__}: {exc}") from exc


async def _awaited(ref: Awaitable[_T]) -> _T:
    return await ref


def _cause(exc: RayTaskError, name: str) -> ParrotError:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ParrotError):
        return cause
    return EngineError(f"engine {name!r} failed: {cause!r}")


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except RayActorError as exc:
        raise EngineDiedError(f"{what} died: {type(exc).__name__}") from exc
    except RayTaskError as exc:
        raise _cause(exc, what) from None
