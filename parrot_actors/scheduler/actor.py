"""The scheduler actor: a thin async shell around the policy core.

It keeps the queue of ready calls, asks the policy where they go, picks and maintains the
prefix contexts they fork, and runs each placed call on its engine (`executor.run_call`).
Calls for a model that no engine serves fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections import deque

from parrot_actors.errors import CallError, ParrotError
from parrot_actors.messages import LATENCY_PRIORITY
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.scheduler.executor import CallStats, first_segment, priority_of, run_call
from parrot_actors.scheduler.policy import (
    CallInfo,
    EngineState,
    eligible,
    schedule_app,
    schedule_fcfs,
)
from parrot_actors.scheduler.prefixes import PrefixEntry, PrefixManager
from parrot_actors.scheduler.tap import TokenTap
from parrot_actors.variables.graph import SemanticCall, get_perf_objective, prefix_hash
from parrot_actors.variables.lifecycle import CallState, advance


def _token_key(ids: list[int]) -> str:
    return "t:" + hashlib.sha256(repr(ids).encode()).hexdigest()[:24]


class Scheduler:
    """Places ready calls on engines and runs them.

    engines: objects with the engine API (`fill`, `generate`, `free_context`, `stats`,
    `tokenize`, `name`, `model_name`; `add_listener` if their health can change). event_log:
    the latest `config.event_log_size` (event, call id, detail) tuples in order: "ready",
    "dispatch" (detail: engine name), "retry", "resolved" (an output; detail: its name; logged
    by the runtime), "done", "failed". call_stats: the latest `config.call_stats_size`
    finished calls' `CallStats`.

    Engine health: an engine that is down takes no new calls, and when it is back the queue is
    dispatched again. When its loop was rebuilt (`stats().restarts` changed) its prefix contexts
    are gone, so their entries are dropped before anything is placed there. (A Ray engine
    whose actor restarted keeps them: its proxy refills them when next used.)
    """

    def __init__(self, engines: list, config: SchedulerConfig | None = None) -> None:
        self.config = (config or SchedulerConfig()).validate()
        self.engines = {e.name: e for e in engines}
        self.ready: dict[int, tuple[SemanticCall, float, int]] = {}
        self.running: dict[int, tuple[SemanticCall, str, asyncio.Task]] = {}
        self.call_stats: deque[CallStats] = deque(maxlen=self.config.call_stats_size)
        self.event_log: deque[tuple[str, int, str]] = deque(maxlen=self.config.event_log_size)
        self._restarts_seen: dict[str, int] = {}
        self.prefixes = PrefixManager(self.config.static_prefix_cache)
        self._keys: dict[int, list[str]] = {}
        self._used: dict[int, PrefixEntry | None] = {}
        self._ids: dict[int, list[int]] = {}
        self._seq = itertools.count()
        self._ctx_ids = itertools.count()
        self._background: set[asyncio.Task] = set()
        self._retries: dict[int, int] = {}
        self.tap = TokenTap()
        self.on_call_end: list = []  # callbacks(call), once per registered call
        for engine in engines:
            add_listener = getattr(engine, "add_listener", None)
            if add_listener is not None:
                add_listener(self._on_health)

    def tasks_of(self, call_ids: set[int]) -> list[asyncio.Task]:
        """The tasks of the running calls among `call_ids` (to wait for their cleanup)."""
        return [t for cid, (_, _, t) in self.running.items() if cid in call_ids and not t.done()]

    def _on_health(self, engine: object) -> None:
        if engine.healthy:
            self.dispatch()  # calls waiting for this engine may go now

    def _forget_prefixes(self, engine_name: str) -> None:
        """Drop the prefix entries of an engine whose contexts were lost (freeing them only
        clears the engine's record of the loss)."""
        for key, eng in list(self.prefixes.entries):
            if eng == engine_name:
                self._spawn(self._free_prefix(self.prefixes._drop(key, eng)))

    def _check_restarts(self, name: str, restarts: int) -> None:
        seen = self._restarts_seen.setdefault(name, restarts)
        if restarts != seen:
            self._restarts_seen[name] = restarts
            self._forget_prefixes(name)

    @property
    def sharing(self) -> bool:
        """Prefix sharing is on (the app policy with prefix_sharing=True)."""
        return self.config.prefix_sharing

    # ---- graph events -------------------------------------------------------------------------

    def register(self, call: SemanticCall) -> None:
        """A call entered the graph: count its prefix keys as pending (prefix lifetimes)."""
        static, dynamic = prefix_hash(call)
        keys = [k for k in (static, dynamic) if k]
        self._keys[call.id] = keys
        if self.sharing:
            self.prefixes.add_pending(keys)

    def enqueue(self, call: SemanticCall) -> None:
        """A call whose inputs are all resolved and whose output is wanted."""
        self.ready[call.id] = (call, time.perf_counter(), next(self._seq))
        self.event_log.append(("ready", call.id, ""))
        self.dispatch()

    def cancel(self, call: SemanticCall) -> None:
        """Drop a queued call, or cancel a running one (its engine work stops)."""
        if self.ready.pop(call.id, None) is not None:
            self._release(call)
        running = self.running.get(call.id)
        if running is not None:
            running[2].cancel()
        elif call.id in self._keys and call.id not in self.ready:
            self._release(call)

    def _release(self, call: SemanticCall) -> None:
        self._retries.pop(call.id, None)
        keys = self._keys.pop(call.id, None)
        if keys is None:
            return
        for fn in self.on_call_end:
            fn(call)
        entry = self._used.pop(call.id, None)
        self._ids.pop(call.id, None)
        if self.sharing:
            for e in self.prefixes.release(keys, entry):
                self._spawn(self._free_prefix(e))

    # ---- placement ----------------------------------------------------------------------------

    def engine_states(self, include_unhealthy: bool = False) -> list[EngineState]:
        """A snapshot of every engine for the policy (healthy ones only, unless asked)."""
        states = []
        for name, engine in self.engines.items():
            if not include_unhealthy and not getattr(engine, "healthy", True):
                continue  # a dead engine (e.g. a Ray actor restarting) takes no new work
            mine = [c for c, e, _ in self.running.values() if e == name]
            s = engine.stats()
            self._check_restarts(name, s.restarts)
            held = tuple(k for (k, e) in self.prefixes.entries if e == name)
            states.append(
                EngineState(
                    name=name,
                    model=engine.model_name,
                    running_calls=len(mine),
                    running_latency=sum(get_perf_objective(c) == "latency" for c in mine),
                    free_blocks=s.kv_blocks_total - s.kv_blocks_used,
                    block_size=s.block_size,
                    prefixes=held,
                )
            )
        return states

    def _all_states(self) -> list[EngineState]:
        return [
            EngineState(name=n, model=e.model_name, aliases=tuple(getattr(e, "aliases", ())))
            for n, e in self.engines.items()
        ]

    def _prompt_ids(self, call: SemanticCall, engine: object) -> list[int]:
        ids = self._ids.get(call.id)
        if ids is None:
            ids = engine.tokenize(first_segment(call, engine), first=True)
            self._ids[call.id] = ids
        return ids

    def _info(
        self, call: SemanticCall, ready_at: float, seq: int, now: float, engine: object
    ) -> CallInfo:
        sampling = [
            dict(p.sampling).get("max_tokens", 64) for p in call.pieces if p.kind == "output"
        ]
        keys = tuple(self._keys.get(call.id, ()))
        ids = self._prompt_ids(call, engine) if engine is not None else []
        if len(ids) > self.config.min_shared_tokens:
            keys += (_token_key(ids[: self.config.min_shared_tokens]),)
        fcfs = self.config.policy == "fcfs"
        return CallInfo(
            call_id=call.id,
            objective="latency" if fcfs else get_perf_objective(call),
            seq=seq,
            task_group=None if fcfs else call.task_group,
            prefix_keys=keys if self.sharing else (),
            prompt_tokens=len(ids),
            max_new_tokens=sum(int(x or 0) for x in sampling),
            model=call.model,
            waited_s=now - ready_at,
        )

    def dispatch(self) -> None:
        """Ask the policy for placements and start the placed calls."""
        if not self.ready:
            return
        now = time.perf_counter()
        states = self.engine_states()
        infos = []
        for call, ready_at, seq in list(self.ready.values()):
            probe = CallInfo(call_id=call.id, objective="", seq=seq, model=call.model)
            cands = eligible(probe, states)
            if not cands and eligible(probe, self._all_states()):
                continue  # only restarting engines serve it: wait for one to come back
            if not cands:
                self.ready.pop(call.id)
                served = sorted({s.model for s in states})
                self._fail(
                    call,
                    CallError(
                        f"{call.function_name}#{call.id} needs model "
                        f"{call.model!r}; the engines serve {served}"
                    ),
                )
                continue
            try:
                infos.append(self._info(call, ready_at, seq, now, self.engines[cands[0].name]))
            except ParrotError as exc:
                self.ready.pop(call.id)
                self._fail(call, CallError(f"{call.function_name}#{call.id} failed: {exc}"))
        cfg = self.config
        if cfg.policy == "fcfs":
            placements = schedule_fcfs(infos, states)
        else:
            placements = schedule_app(
                infos, states, cfg.latency_cap, cfg.throughput_cap, cfg.max_throughput_wait_s
            )
        by_id = {i.call_id: i for i in infos}
        groups = self._token_groups(infos, placements)
        for placement in placements:
            call, ready_at, _ = self.ready.pop(placement.call_id)
            self._start(call, placement.engine, ready_at, by_id[call.id], groups)

    def _token_groups(self, infos: list[CallInfo], placements: list) -> dict[int, tuple]:
        """Token-level sharing: calls placed on one engine in this round whose prompts share
        at least `min_shared_tokens` leading tokens that no prefix key predicted get an ad hoc
        prefix (their common tokens). Returns call id -> (key, tokens)."""
        if not self.sharing:
            return {}
        buckets: dict[tuple[str, str], list[int]] = {}
        for p in placements:
            info = next(i for i in infos if i.call_id == p.call_id)
            tkeys = [k for k in info.prefix_keys if k.startswith("t:")]
            if tkeys:
                buckets.setdefault((tkeys[0], p.engine), []).append(p.call_id)
        out: dict[int, tuple] = {}
        for ids in buckets.values():
            if len(ids) < 2:
                continue
            seqs = [self._ids[i] for i in ids]
            n = min(len(s) for s in seqs) - 1
            common = 0
            while common < n and all(s[common] == seqs[0][common] for s in seqs):
                common += 1
            tokens = tuple(seqs[0][:common])
            for i in ids:
                out[i] = (_token_key(list(tokens)), tokens)
        return out

    def _choose_prefix(
        self, call: SemanticCall, engine_name: str, ad_hoc: tuple | None
    ) -> PrefixEntry | None:
        """The prefix context `call` forks on `engine_name`, creating it if needed; None when
        nothing worth sharing (under a block of tokens) applies."""
        if not self.sharing:
            return None
        engine = self.engines[engine_name]
        ids = self._ids[call.id]
        bs = engine.stats().block_size
        static, dynamic = prefix_hash(call)
        options: list[tuple[str, str | None, bool, tuple | None]] = []
        if dynamic and (
            self.prefixes.pending.get(dynamic, 0) >= 2 or self.prefixes.get(dynamic, engine_name)
        ):
            options.append((dynamic, _prefix_text(call, dynamic=True), False, None))
        if static:
            options.append((static, _prefix_text(call, dynamic=False), True, None))
        if ad_hoc is not None:
            options.append((ad_hoc[0], None, False, ad_hoc[1]))
        for key, text, is_static, tokens in options:
            entry = self.prefixes.get(key, engine_name)
            if (
                entry is not None
                and entry.ready.done()
                and (entry.ready.cancelled() or entry.ready.exception() is not None)
            ):
                self.prefixes._drop(key, engine_name)  # its fill failed: build it again
                entry = None
            if entry is None:
                if tokens is None:
                    tokens = tuple(engine.tokenize(text, first=True)[:-1])
                if len(tokens) < bs or len(tokens) >= len(ids):
                    continue
                if key.startswith("t:"):
                    self.prefixes.add_pending([key])
                    self._keys[call.id].append(key)
                entry = self.prefixes.create(key, engine_name, tokens, is_static)
                entry.ready = asyncio.get_running_loop().create_task(
                    engine.fill(
                        entry.context_id, token_ids=list(tokens), priority=priority_of(call)
                    )
                )
            elif key.startswith("t:") and key not in self._keys[call.id]:
                self.prefixes.add_pending([key])
                self._keys[call.id].append(key)
            if tuple(ids[: len(entry.tokens)]) == entry.tokens and len(ids) > len(entry.tokens):
                entry.users += 1
                return entry
        return None

    def _make_room(self, engine_name: str, blocks: int) -> None:
        """Free idle cached static prefixes on an engine short of KV blocks."""
        s = self.engines[engine_name].stats()
        free = s.kv_blocks_total - s.kv_blocks_used
        while free < blocks:
            entry = self.prefixes.evict_idle(engine_name)
            if entry is None:
                return
            free += -(-len(entry.tokens) // s.block_size)
            self._spawn(self._free_prefix(entry))

    def _fail(self, call: SemanticCall, error: CallError) -> None:
        advance(call, CallState.FAILED)
        self.event_log.append(("failed", call.id, str(error)))
        for out in call.outputs:
            out.fail(error)
        self._release(call)

    def _start(
        self,
        call: SemanticCall,
        engine_name: str,
        ready_at: float,
        info: CallInfo,
        groups: dict[int, tuple],
    ) -> None:
        advance(call, CallState.RUNNING)
        self.event_log.append(("dispatch", call.id, engine_name))
        stats = CallStats(
            call_id=call.id,
            function=call.function_name,
            engine=engine_name,
            objective=info.objective,
        )
        blocks = -(-(info.prompt_tokens + info.max_new_tokens) // 16)
        self._make_room(engine_name, blocks)
        entry = self._choose_prefix(call, engine_name, groups.get(call.id))
        self._used[call.id] = entry
        ctx = f"call{call.id}-{next(self._ctx_ids)}"
        priority = LATENCY_PRIORITY if self.config.policy == "fcfs" else priority_of(call)
        task = asyncio.get_running_loop().create_task(
            run_call(
                call,
                self.engines[engine_name],
                stats,
                ready_at,
                ctx,
                prompt_ids=self._ids[call.id],
                prefix=entry,
                priority=priority,
                can_retry=self._retries.get(call.id, 0) < self.config.max_retries,
                tap=self.tap,
            )
        )
        self.running[call.id] = (call, engine_name, task)
        task.add_done_callback(lambda _t, c=call, st=stats: self._finished(c, st))

    def _finished(self, call: SemanticCall, stats: CallStats) -> None:
        self.running.pop(call.id, None)
        if call.state is CallState.RETRY:
            self._retries[call.id] = self._retries.get(call.id, 0) + 1
            self.event_log.append(("retry", call.id, stats.engine))
            entry = self._used.pop(call.id, None)
            if entry is not None:
                entry.users -= 1
            advance(call, CallState.READY)
            self.ready[call.id] = (call, time.perf_counter(), next(self._seq))
            self.dispatch()
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

    # ---- background work ----------------------------------------------------------------------

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _free_prefix(self, entry: PrefixEntry) -> None:
        with contextlib.suppress(BaseException):
            if entry.ready is not None:
                await entry.ready
        with contextlib.suppress(ParrotError):
            await self.engines[entry.engine].free_context(entry.context_id)

    async def close(self) -> None:
        """Cancel running calls, free prefix contexts, and wait for all of it."""
        tasks = [t for _, _, t in self.running.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for key, eng in list(self.prefixes.entries):
            self._spawn(self._free_prefix(self.prefixes._drop(key, eng)))
        await asyncio.gather(*list(self._background), return_exceptions=True)


def _prefix_text(call: SemanticCall, dynamic: bool) -> str:
    """The prompt text a static (leading constant text) or dynamic (text through the first
    input variable's value) prefix covers."""
    text = ""
    for p in call.pieces:
        if p.kind == "text":
            text += p.text
            if not dynamic:
                return text
        elif p.kind == "input":
            if not dynamic:
                return text
            return text + p.var.value()
        else:
            break
    return text
