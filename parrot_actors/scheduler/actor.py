"""The scheduler actor: a thin async shell around the policy core.

It keeps the queue of ready calls, asks the policy (policy.py) where they go, has prefix
sharing (sharing.py) pick the prefix context each placed call forks, and runs each call on its
engine (executor.py). Planning happens at most once per event-loop turn however many events
asked for it, and looks only at the head of the queue, as many calls as the engines have free
slots for (plus a margin), so its cost follows the free capacity, not the queue's length.
Calls for a model that no engine serves fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from parrot_actors import clock
from parrot_actors.engines.api import EngineClient
from parrot_actors.errors import CallError, OverloadedError, ParrotError
from parrot_actors.messages import LATENCY_PRIORITY
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.scheduler.executor import (
    CallStats,
    ForkFrom,
    ProgramStats,
    first_segment,
    priority_of,
    run_call,
    sampling_of,
)
from parrot_actors.scheduler.policy import (
    CallInfo,
    EngineState,
    Placement,
    admission_key,
    eligible,
    latency_step_s,
    predicted_wait_s,
    schedule_app,
    schedule_fcfs,
    service_s,
)
from parrot_actors.scheduler.prefixes import PrefixEntry, PrefixManager
from parrot_actors.scheduler.retention import Retained, Retention, common_prefix
from parrot_actors.scheduler.sharing import PrefixSharing
from parrot_actors.scheduler.tap import TokenTap
from parrot_actors.variables.graph import SemanticCall, get_perf_objective
from parrot_actors.variables.lifecycle import CallState, advance

WINDOW_SLACK = 16
"""Calls planned beyond the free slots each round, for those the policy passes over (a model
whose engines are full, a call that waits for KV room)."""


@dataclass(eq=False)
class _Ready:
    """A queued call: when it became ready (seconds, `clock.now()`) and its arrival number."""

    call: SemanticCall
    ready_at: float
    seq: int


class Scheduler:
    """Places ready calls on engines and runs them.

    engines: the engines (`EngineClient`s). event_log: the latest `config.event_log_size`
    (event, call id, detail) tuples in order: "ready", "dispatch" (detail: engine name),
    "retry", "resolved" (an output; detail: its name; logged by the runtime), "done",
    "failed". call_stats: the latest `config.call_stats_size` finished calls' `CallStats`.
    tap: listeners of outputs being generated (the executor streams those).

    Programs (sessions): calls that name a `program` are ordered by the predicted engine
    seconds their program has been served so far (least first, `policy.admission_key`,
    `policy.service_s`), and a finished call with a
    `retain_s` leaves its context in `retention` for the program's next call, which is placed
    on that engine and forks the context at the token level (`retention.py`).

    Overload: `admit` refuses a latency call whose predicted wait is over the tenant's bound,
    and a throughput call past the tenant's queue bound, with `OverloadedError` (HTTP 429).

    Engine health: an engine that is down takes no new calls, and when it is back the queue is
    dispatched again. When its loop was rebuilt (`stats().restarts` changed) its prefix contexts
    are gone, so their entries are dropped before anything is placed there. (A Ray engine
    whose actor restarted keeps them: its proxy refills them when next used.)
    """

    def __init__(
        self, engines: Sequence[EngineClient], config: SchedulerConfig | None = None
    ) -> None:
        self.config = (config or SchedulerConfig()).validate()
        self.engines: dict[str, EngineClient] = {e.name: e for e in engines}
        self.ready: dict[int, _Ready] = {}
        self.running: dict[int, tuple[SemanticCall, str, asyncio.Task[None]]] = {}
        self.call_stats: deque[CallStats] = deque(maxlen=self.config.call_stats_size)
        self.event_log: deque[tuple[str, int, str]] = deque(maxlen=self.config.event_log_size)
        self.tap = TokenTap()
        self.on_call_end: list[Callable[[SemanticCall], None]] = []  # once per registered call
        self.sharing = PrefixSharing(
            self.engines, self.config.static_prefix_cache, self.config.min_shared_tokens
        )
        self._registered: set[int] = set()
        self._used: dict[int, PrefixEntry | None] = {}
        self._ids: dict[int, list[int]] = {}
        self._latency_kv: dict[int, int] = {}  # running latency call -> prompt + max new tokens
        self._tenant: dict[int, str] = {}  # admitted call -> its tenant
        self._retries: dict[int, int] = {}
        self._restarts_seen: dict[str, int] = {}
        self.retention = Retention(self.config.max_retained_contexts)
        self._forking: dict[int, Retained] = {}  # call id -> the retained context it forks
        self._doomed: set[int] = set()  # ids of retained contexts to free once nobody forks
        self._expiry: asyncio.TimerHandle | None = None
        self._programs: OrderedDict[str, ProgramStats] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()
        self._seq = itertools.count()
        self._ctx_ids = itertools.count()
        self._dispatch_pending = False
        for engine in engines:
            engine.add_listener(self._on_health)

    @property
    def prefixes(self) -> PrefixManager:
        """The prefix contexts' bookkeeping (which exist where, who needs them)."""
        return self.sharing.manager

    @property
    def shares_prefixes(self) -> bool:
        """Prefix sharing is on (`SchedulerConfig.prefix_sharing`)."""
        return self.config.prefix_sharing

    # ---- graph events -------------------------------------------------------------------------

    def register(self, call: SemanticCall) -> None:
        """A call entered the graph: count its prefix keys as pending (prefix lifetimes)."""
        self._registered.add(call.id)
        if self.shares_prefixes:
            self.sharing.register(call)

    def enqueue(self, call: SemanticCall) -> None:
        """A call whose inputs are all resolved and whose output is wanted. One that no engine
        serves fails at once."""
        self.event_log.append(("ready", call.id, ""))
        probe = CallInfo(call_id=call.id, objective="", seq=0, model=call.model)
        if not eligible(probe, self._all_states()):
            served = sorted({e.model_name for e in self.engines.values()})
            error = f"{call.function_name}#{call.id} needs model {call.model!r}; the engines "
            self._fail(call, CallError(error + f"serve {served}"))
            return
        self.ready[call.id] = _Ready(call, clock.now(), next(self._seq))
        self.dispatch()

    def admit(self, call: SemanticCall, tenant: str = "default") -> None:
        """Refuse, before it enters the graph, a call the engines would not serve in bounded
        time. A latency call: its predicted wait (`policy.predicted_wait_s`: the latency calls
        running and queued for its model ahead of it, on the latency slots of the engines that
        serve it, each taking what this call takes in a full batch by their step-time model)
        against the tenant's bound (`config.tenant_max_latency_wait_s`, else
        `max_latency_wait_s`; None: never refused). A throughput call: the tenant's queued
        throughput calls against `config.max_queued_throughput`. A call no healthy engine
        serves is left to `enqueue` (it fails or waits there). Raises `OverloadedError` with
        the seconds after which a retry would be under the bound."""
        cfg = self.config
        if get_perf_objective(call) != "latency":
            queued = sum(
                1
                for q in self.ready.values()
                if self._tenant.get(q.call.id) == tenant
                and get_perf_objective(q.call) != "latency"
            )
            if queued >= cfg.max_queued_throughput:
                raise OverloadedError(
                    f"tenant {tenant!r} has {queued} throughput calls queued: at most "
                    f"max_queued_throughput={cfg.max_queued_throughput}",
                    retry_after_s=cfg.max_throughput_wait_s,
                )
            self._tenant[call.id] = tenant
            return
        bound = cfg.tenant_max_latency_wait_s.get(tenant, cfg.max_latency_wait_s)
        self._tenant[call.id] = tenant
        if bound is None:
            return
        probe = CallInfo(call_id=call.id, objective="", seq=0, model=call.model)
        cands = eligible(probe, self.engine_states())
        if not cands:
            return
        caps = {s.name: cfg.latency_cap or s.max_running for s in cands}
        slots = sum(caps.values())
        ahead = sum(s.running_latency for s in cands) + sum(
            1
            for q in self.ready.values()
            if q.call.model == call.model and get_perf_objective(q.call) == "latency"
        )
        if ahead < slots:
            return
        engine = self.engines[cands[0].name]
        model = engine.step_model()
        prompt = 0  # an input without a value yet: its length is unknown
        with contextlib.suppress(ParrotError):
            prompt = len(_prompt_ids(call, engine))
        new = _max_new_tokens(call)
        call_s = service_s(model, prompt, 0, 0)
        cap = caps[cands[0].name]
        if model is not None:
            call_s += new * latency_step_s(model, cap, cap * (prompt + (new + 1) // 2))
        else:
            call_s += service_s(None, 0, 0, new)
        wait = predicted_wait_s(ahead, slots, call_s)
        if wait > bound:
            self._tenant.pop(call.id, None)
            raise OverloadedError(
                f"{call.function_name}#{call.id}: predicted wait {wait:.2f} s ({ahead} latency "
                f"calls ahead on {slots} slots) is over the bound of {bound:g} s for tenant "
                f"{tenant!r} (max_latency_wait_s)",
                retry_after_s=wait - bound,
            )

    def cancel(self, call: SemanticCall) -> None:
        """Drop a queued call, or cancel a running one (its engine work stops)."""
        if self.ready.pop(call.id, None) is not None:
            self._release(call)
        running = self.running.get(call.id)
        if running is not None:
            running[2].cancel()
        elif call.id in self._registered and call.id not in self.ready:
            self._release(call)

    def tasks_of(self, call_ids: set[int]) -> list[asyncio.Task[None]]:
        """The tasks of the running calls among `call_ids` (to wait for their cleanup)."""
        return [t for cid, (_, _, t) in self.running.items() if cid in call_ids and not t.done()]

    def _release(self, call: SemanticCall) -> None:
        self._retries.pop(call.id, None)
        if call.id not in self._registered:
            return
        self._registered.discard(call.id)
        for fn in self.on_call_end:
            fn(call)
        entry = self._used.pop(call.id, None)
        self._ids.pop(call.id, None)
        self._tenant.pop(call.id, None)
        if self.shares_prefixes:
            self.sharing.release(call, entry)

    # ---- engines ------------------------------------------------------------------------------

    def _on_health(self, engine: EngineClient) -> None:
        if engine.healthy:
            self.dispatch()  # calls waiting for this engine may go now

    def engine_states(self, include_unhealthy: bool = False) -> list[EngineState]:
        """A snapshot of every engine for the policy (healthy ones only, unless asked)."""
        running: dict[str, list[SemanticCall]] = {name: [] for name in self.engines}
        latency_kv = dict.fromkeys(self.engines, 0)
        for call, name, _ in self.running.values():
            running[name].append(call)
            latency_kv[name] += self._latency_kv.get(call.id, 0)
        held: dict[str, list[str]] = {name: [] for name in self.engines}
        for key, name in self.prefixes.entries:
            held[name].append(key)
        for program, name in self.retention.placements():
            held[name].append(program_key(program))
        states = []
        for name, engine in self.engines.items():
            if not include_unhealthy and not engine.healthy:
                continue  # a dead engine (e.g. a Ray actor restarting) takes no new work
            s = engine.stats()
            self._check_restarts(name, s.restarts)
            mine = running[name]
            states.append(
                EngineState(
                    name=name,
                    model=engine.model_name,
                    aliases=engine.aliases,
                    running_calls=len(mine),
                    running_latency=sum(get_perf_objective(c) == "latency" for c in mine),
                    free_blocks=s.kv_blocks_total - s.kv_blocks_used,
                    block_size=s.block_size,
                    prefixes=tuple(held[name]),
                    max_running=s.max_running or 64,
                    latency_kv_tokens=latency_kv[name],
                    step_model=engine.step_model(),
                )
            )
        return states

    def _all_states(self) -> list[EngineState]:
        return [
            EngineState(name=n, model=e.model_name, aliases=e.aliases)
            for n, e in self.engines.items()
        ]

    def _check_restarts(self, name: str, restarts: int) -> None:
        seen = self._restarts_seen.setdefault(name, restarts)
        if restarts != seen:
            self._restarts_seen[name] = restarts
            self.sharing.forget(name)
            for r in self.retention.drop_engine(name):
                self._free_retained(r)

    # ---- placement ----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Plan placements at the end of this event-loop turn: once, however many events ask
        for it in the turn."""
        if not self._dispatch_pending:
            self._dispatch_pending = True
            asyncio.get_running_loop().call_soon(self._dispatch_now)

    def _dispatch_now(self) -> None:
        self._dispatch_pending = False
        if not self.ready:
            return
        now = clock.now()
        states = self.engine_states()
        infos: dict[int, CallInfo] = {}
        for queued in self._window(states, now):
            call = queued.call
            probe = CallInfo(call_id=call.id, objective="", seq=queued.seq, model=call.model)
            cands = eligible(probe, states)
            if not cands:
                continue  # only engines that are down serve it: wait for one to come back
            try:
                infos[call.id] = self._info(queued, now, self.engines[cands[0].name])
            except ParrotError as exc:
                self.ready.pop(call.id)
                self._fail(call, CallError(f"{call.function_name}#{call.id} failed: {exc}"))
        cfg = self.config
        if cfg.policy == "fcfs":
            placements = schedule_fcfs(list(infos.values()), states)
        else:
            placements = schedule_app(
                list(infos.values()),
                states,
                cfg.latency_cap,
                cfg.throughput_cap,
                cfg.max_throughput_wait_s,
                latency_tpot_s=cfg.latency_tpot_s,
                latency_pack_slack=cfg.latency_pack_slack,
            )
        groups = self.sharing.token_groups(infos, placements, self._ids)
        block_size = {s.name: s.block_size for s in states}
        for placement in placements:
            queued = self.ready.pop(placement.call_id)
            self._start(queued, placement, infos[placement.call_id], groups, block_size)

    def _window(self, states: list[EngineState], now: float) -> list[_Ready]:
        """The head of the queue in admission order: per model, as many calls as the engines
        serving it have free slots, plus `WINDOW_SLACK` (FCFS places everything: all)."""
        queued = list(self.ready.values())
        if self.config.policy == "fcfs":
            return queued
        slots = {
            s.name: max(
                self.config.throughput_cap - s.running_calls,
                (self.config.latency_cap or s.max_running) - s.running_latency,
                0,
            )
            for s in states
        }
        by_model: dict[str | None, list[_Ready]] = {}
        first: dict[int, int] = {}
        for q in queued:
            by_model.setdefault(q.call.model, []).append(q)
            group = q.call.task_group
            if group is not None:
                first[group] = min(first.get(group, q.seq), q.seq)
        wait = self.config.max_throughput_wait_s

        def key(q: _Ready) -> tuple[int, float, int, int]:
            group, program = q.call.task_group, q.call.program
            return admission_key(
                get_perf_objective(q.call),
                now - q.ready_at,
                first[group] if group is not None else q.seq,
                q.seq,
                wait,
                self.attained(program),
            )

        window: list[_Ready] = []
        for model, members in by_model.items():
            probe = CallInfo(call_id=-1, objective="", seq=0, model=model)
            free = sum(slots[s.name] for s in eligible(probe, states))
            if free:
                window += heapq.nsmallest(free + WINDOW_SLACK, members, key=key)
        return window

    def _info(self, queued: _Ready, now: float, engine: EngineClient) -> CallInfo:
        call = queued.call
        ids = self._ids.get(call.id)
        if ids is None:
            ids = self._ids[call.id] = _prompt_ids(call, engine)
        fcfs = self.config.policy == "fcfs"
        keys = self.sharing.keys_of(call, ids, engine) if self.shares_prefixes else ()
        if self.retention.engine_of(call.program) is not None:
            keys += (program_key(call.program),)  # go where its retained context is
        return CallInfo(
            call_id=call.id,
            objective="latency" if fcfs else get_perf_objective(call),
            seq=queued.seq,
            task_group=None if fcfs else call.task_group,
            prefix_keys=keys,
            prompt_tokens=len(ids),
            max_new_tokens=_max_new_tokens(call),
            model=call.model,
            waited_s=now - queued.ready_at,
            attained=0.0 if fcfs else self.attained(call.program),
        )

    def _start(
        self,
        queued: _Ready,
        placement: Placement,
        info: CallInfo,
        groups: dict[int, tuple[str, tuple[int, ...]]],
        block_size: dict[str, int],
    ) -> None:
        call, engine_name = queued.call, placement.engine
        advance(call, CallState.RUNNING)
        self.event_log.append(("dispatch", call.id, engine_name))
        stats = CallStats(
            call_id=call.id,
            function=call.function_name,
            engine=engine_name,
            objective=info.objective,
            program=call.program,
        )
        ids = self._ids[call.id]
        entry = None
        fork = self._retained_fork(call, engine_name, ids)
        if self.shares_prefixes:
            need = info.prompt_tokens + info.max_new_tokens
            self.sharing.make_room(engine_name, -(-need // block_size[engine_name]))
            if fork is None:
                entry = self.sharing.choose(call, engine_name, ids, groups.get(call.id))
                if entry is not None:
                    fork = ForkFrom(entry.context_id, len(entry.tokens), entry.ready)
        self._used[call.id] = entry
        if info.objective == "latency":
            self._latency_kv[call.id] = info.prompt_tokens + info.max_new_tokens
        priority = LATENCY_PRIORITY if self.config.policy == "fcfs" else priority_of(call)
        task = asyncio.get_running_loop().create_task(
            run_call(
                call,
                self.engines[engine_name],
                stats,
                queued.ready_at,
                f"call{call.id}-{next(self._ctx_ids)}",
                prompt_ids=ids,
                fork=fork,
                priority=priority,
                can_retry=self._retries.get(call.id, 0) < self.config.max_retries,
                tap=self.tap,
                retain=lambda c, ctx, tokens: self._retain(engine_name, c, ctx, tokens),
            )
        )
        self.running[call.id] = (call, engine_name, task)
        task.add_done_callback(lambda _: self._finished(call, stats))

    def _finished(self, call: SemanticCall, stats: CallStats) -> None:
        self.running.pop(call.id, None)
        self._latency_kv.pop(call.id, None)
        self._done_forking(call)
        if call.program is not None:
            served = self._programs.pop(call.program, None) or ProgramStats()
            engine = self.engines.get(stats.engine)
            seconds = service_s(
                engine.step_model() if engine is not None else None,
                stats.computed_tokens,
                stats.prompt_tokens - stats.computed_tokens,
                stats.completion_tokens,
            )
            served.add(stats, call.cached_tokens, seconds)
            self._programs[call.program] = served  # most recently served last
            while len(self._programs) > self.config.max_programs:
                self._programs.popitem(last=False)
        if call.state is CallState.RETRY:
            self._retry(call, stats.engine)
            return
        self.call_stats.append(stats)
        done = call.state is CallState.DONE
        self.event_log.append(("done" if done else "failed", call.id, ""))
        if not done:
            advance(call, CallState.FAILED)  # cancelled while it ran
            for out in call.outputs:
                if not out.done():
                    out.fail(CallError(f"{call.function_name}#{call.id} was cancelled"))
        self._release(call)
        self.dispatch()

    def _retry(self, call: SemanticCall, engine_name: str) -> None:
        """Queue again a call whose engine died before it delivered anything."""
        self._retries[call.id] = self._retries.get(call.id, 0) + 1
        self.event_log.append(("retry", call.id, engine_name))
        entry = self._used.pop(call.id, None)
        if entry is not None:
            entry.users -= 1
        advance(call, CallState.READY)
        self.ready[call.id] = _Ready(call, clock.now(), next(self._seq))
        self.dispatch()

    def _fail(self, call: SemanticCall, error: CallError) -> None:
        advance(call, CallState.FAILED)
        self.event_log.append(("failed", call.id, str(error)))
        for out in call.outputs:
            out.fail(error)
        self._release(call)

    # ---- retained contexts ----------------------------------------------------------------

    def attained(self, program: str | None) -> float:
        """Predicted engine seconds the program's calls have been served so far
        (`ProgramStats.service_s`; 0 for None or a program not seen, or forgotten among more
        than `config.max_programs`)."""
        served = self._programs.get(program) if program is not None else None
        return served.service_s if served is not None else 0.0

    def program_stats(self, program: str) -> ProgramStats | None:
        """What the program has been served (None if unknown); see `ProgramStats`."""
        return self._programs.get(program)

    def _retained_fork(
        self, call: SemanticCall, engine_name: str, ids: list[int]
    ) -> ForkFrom | None:
        """A fork of the program's retained context on `engine_name` covering the longest
        prefix it shares with `ids` (one token at least is left to compute), or None."""
        call.cached_tokens = 0
        kept = self.retention.lookup(call.program, engine_name)
        if kept is None or id(kept) in self._doomed:
            return None
        k = min(common_prefix(kept.tokens, ids), len(ids) - 1)
        if k <= 0:
            return None
        kept.users += 1
        self._forking[call.id] = kept
        call.cached_tokens = k
        return ForkFrom(kept.context_id, k)

    def _done_forking(self, call: SemanticCall) -> None:
        kept = self._forking.pop(call.id, None)
        if kept is not None:
            kept.users -= 1
            if kept.users == 0 and id(kept) in self._doomed:
                self._doomed.discard(id(kept))
                self._spawn(self._free_context(kept.engine, kept.context_id))

    def _retain(
        self, engine_name: str, call: SemanticCall, context_id: str, tokens: list[int]
    ) -> bool:
        """Keep a finished call's context for its program (`run_call`'s `retain` hook)."""
        if call.program is None or call.retain_s <= 0:
            return False
        for old in self.retention.keep(
            call.program, engine_name, context_id, tokens, call.retain_s
        ):
            self._free_retained(old)
        self._arm_expiry()
        return True

    def _free_retained(self, kept: Retained) -> None:
        if kept.users > 0:
            self._doomed.add(id(kept))  # freed when the last call forking it is done
        else:
            self._spawn(self._free_context(kept.engine, kept.context_id))

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        when = self.retention.next_expiry()
        if when is not None:
            delay = max(0.0, when - clock.now()) + 0.01
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        for kept in self.retention.expired():
            self._free_retained(kept)
        self._arm_expiry()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _free_context(self, engine_name: str, context_id: str) -> None:
        with contextlib.suppress(ParrotError):
            await self.engines[engine_name].free_context(context_id)

    async def close(self) -> None:
        """Cancel running calls, free prefix and retained contexts, and wait for all of it."""
        tasks = [t for _, _, t in self.running.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._expiry is not None:
            self._expiry.cancel()
        for kept in self.retention.drop_all():
            self._spawn(self._free_context(kept.engine, kept.context_id))
        await self.sharing.close()
        await asyncio.gather(*list(self._background), return_exceptions=True)


def _prompt_ids(call: SemanticCall, engine: EngineClient) -> list[int]:
    """The token ids of `call`'s prompt before its first output on `engine`. Raises
    `VariableError` if an input has no value yet."""
    if call.prompt_ids is not None:
        return list(call.prompt_ids)
    return engine.tokenize(first_segment(call, engine), first=True)


def _max_new_tokens(call: SemanticCall) -> int:
    """The most tokens `call` generates: every output's `max_tokens`, times its samples."""
    outputs = (p for p in call.pieces if p.kind == "output")
    return sum(sampling_of(p.sampling).max_tokens for p in outputs) * call.samples


def program_key(program: str | None) -> str:
    """The prefix key that draws a program's calls to the engine holding its retained
    context."""
    return f"p:{program}"
