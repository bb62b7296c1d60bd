"""The scheduler's policy core: synchronous and deterministic, no asyncio, no tensors.

`schedule(ready_calls, engine_states) -> placements`. The actor feeds it snapshots and carries
out its placements.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from parrot_actors.engines.step_time import StepPredictor, StepTotals

NOMINAL_TOKEN_S = 1e-3
"""Seconds a token is priced at on an engine without a step-time model yet (a real engine's
first steps, an echo engine, a Ray proxy): the order it gives is the one tokens give."""


class CallInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy knows of a ready call.

    objective: "latency" or "throughput". task_group: id shared by a map stage, or None.
    prefix_keys: static/dynamic prefix keys (may be empty). prompt_tokens / max_new_tokens:
    sizes in tokens (estimates). model: required model name or None. seq: arrival order.
    waited_s: seconds since the call became ready. attained: predicted engine seconds its
    program (session) was served so far (`service_s` of each finished call; 0 for a call of
    no program).
    """

    call_id: int
    objective: str
    seq: int
    task_group: int | None = None
    prefix_keys: tuple[str, ...] = ()
    prompt_tokens: int = 0
    max_new_tokens: int = 0
    model: str | None = None
    waited_s: float = 0.0
    attained: float = 0.0


class EngineState(msgspec.Struct, kw_only=True):
    """What the policy knows of an engine: its served model (and other names for it, e.g.
    "default"), running calls (all / latency), free KV blocks (and block size), the prefix
    keys it holds, the most sequences it batches (`max_running`), the KV tokens its running
    latency calls will hold at their end (`latency_kv_tokens`: prompt + max new tokens, summed)
    and its step-time model (`step_model`, None while it has none)."""

    name: str
    model: str
    aliases: tuple[str, ...] = ()
    running_calls: int = 0
    running_latency: int = 0
    free_blocks: int = 0
    block_size: int = 16
    prefixes: tuple[str, ...] = ()
    max_running: int = 64
    latency_kv_tokens: int = 0
    step_model: Any = None


class Placement(msgspec.Struct, frozen=True):
    """Run call `call_id` on engine `engine`."""

    call_id: int
    engine: str


def eligible(call: CallInfo, engines: list[EngineState]) -> list[EngineState]:
    """Engines that serve the call's model (all engines when it names none)."""
    if call.model is None:
        return list(engines)
    return [e for e in engines if call.model == e.model or call.model in e.aliases]


def schedule_fcfs(ready: list[CallInfo], engines: list[EngineState]) -> list[Placement]:
    """First come, first served: every ready call, in arrival order, goes to the least loaded
    engine that serves its model (fewest running calls, then name). Calls for a model no engine
    serves are left out (the actor fails them)."""
    load = {e.name: e.running_calls for e in engines}
    out: list[Placement] = []
    for call in sorted(ready, key=lambda c: c.seq):
        cands = eligible(call, engines)
        if not cands:
            continue
        best = min(cands, key=lambda e: (load[e.name], e.name))
        load[best.name] += 1
        out.append(Placement(call.call_id, best.name))
    return out


def _blocks_needed(call: CallInfo, engine: EngineState) -> int:
    return -(-(call.prompt_tokens + call.max_new_tokens) // max(engine.block_size, 1))


def _holds_prefix(call: CallInfo, engine: EngineState, placed: dict[str, str]) -> bool:
    # Held already, or placed there earlier in this round (its context is about to exist).
    return any(k in engine.prefixes or placed.get(k) == engine.name for k in call.prefix_keys)


def admission_key(
    objective: str,
    waited_s: float,
    group_first: int,
    seq: int,
    max_wait_s: float,
    attained: float = 0.0,
) -> tuple[int, float, int, int]:
    """Where a ready call stands in line (smaller first): any call that waited `max_wait_s`
    seconds or more (the starvation bound), then latency work, then throughput work; within
    each, the least attained service of the call's program first (Autellix, arXiv 2502.13965:
    program-level least attained service, so a long agent neither starves short ones nor
    blocks them), then the members of a task group together, at the arrival of the group's
    first member (`group_first`; a call's own `seq` when it has no group), then by arrival.
    Calls past the bound go by arrival alone, so the bound holds for every program."""
    if waited_s >= max_wait_s:
        return (0, 0.0, seq, seq)
    klass = 1 if objective == "latency" else 2
    return (klass, attained, group_first, seq)


def group_firsts(ready: list[CallInfo]) -> dict[int, int]:
    """Task group -> the arrival (`seq`) of its first ready member."""
    first: dict[int, int] = {}
    for c in ready:
        if c.task_group is not None:
            first[c.task_group] = min(first.get(c.task_group, c.seq), c.seq)
    return first


def _admission_order(ready: list[CallInfo], max_wait_s: float) -> list[CallInfo]:
    first = group_firsts(ready)

    def key(c: CallInfo) -> tuple[int, float, int, int]:
        group = first[c.task_group] if c.task_group is not None else c.seq
        return admission_key(c.objective, c.waited_s, group, c.seq, max_wait_s, c.attained)

    return sorted(ready, key=key)


def latency_step_s(model: StepPredictor, calls: int, kv_tokens: int) -> float:
    """Predicted seconds of a decode step of `calls` sequences reading `kv_tokens` KV tokens
    in all (the per-token time, TPOT, each of them sees)."""
    n = max(calls, 0)
    return model.predict_totals(
        StepTotals(new=n, decode_kv=max(kv_tokens, n), seqs=n, rows=n, decodes=n)
    )


def service_s(model: StepPredictor | None, computed: int, reused: int, generated: int) -> float:
    """Predicted engine seconds of one call served alone: its prompt's `computed` tokens
    prefilled after `reused` ones already in KV, then `generated` decode steps at the mean
    context length. What a program's attained service counts (Autellix PLAS, arXiv 2502.13965,
    §4, counted in time rather than tokens, so a session of long prompts and one of long outputs
    are each charged what they cost). Without a model: `NOMINAL_TOKEN_S` per token."""
    if model is None:
        return (computed + generated) * NOMINAL_TOKEN_S
    seconds = model.predict_totals(StepTotals().add_prefill(computed, reused)) if computed else 0.0
    if generated:
        context = computed + reused + (generated + 1) // 2
        seconds += generated * model.predict_totals(StepTotals().add_decode(max(context, 1)))
    return seconds


def latency_admits(
    engine: EngineState, call: CallInfo, lat_calls: int, lat_kv: int,
    latency_cap: int | None, latency_tpot_s: float | None,
) -> bool:
    """Whether `engine`, running `lat_calls` latency calls that will hold `lat_kv` KV tokens,
    takes latency call `call` now: under `latency_cap` calls (None: the engine's
    `max_running`), and when `latency_tpot_s` is set and the engine has a model, with the
    predicted decode step of all of them within it (Parrot §5.4: latency work goes where its
    per-token time holds). A call alone on an engine is always taken (it could never run
    otherwise)."""
    cap = latency_cap if latency_cap is not None else engine.max_running
    if lat_calls >= cap:
        return False
    if latency_tpot_s is None or engine.step_model is None or lat_calls == 0:
        return True
    kv = lat_kv + call.prompt_tokens + call.max_new_tokens
    return latency_step_s(engine.step_model, lat_calls + 1, kv) <= latency_tpot_s


def packs_latency(
    engine: EngineState, call: CallInfo, lat_calls: int, lat_kv: int, slack: float
) -> bool:
    """Whether latency call `call` may join the `lat_calls` latency calls (holding `lat_kv` KV
    tokens) on `engine` instead of an engine without latency work: the predicted decode step
    of all of them stays within `(1 + slack)` times the step of `call` alone. On a GPU a
    decode step is bound by the weight read, so latency work packed on a few engines costs
    it little and leaves the others' steps free of its time budget for throughput work
    (Parrot §5.4: latency work on engines apart from throughput work). False without a
    step-time model or latency work there."""
    model = engine.step_model
    if model is None or lat_calls == 0:
        return False
    mine = call.prompt_tokens + call.max_new_tokens
    alone = latency_step_s(model, 1, mine)
    return latency_step_s(model, lat_calls + 1, lat_kv + mine) <= (1 + slack) * alone


def predicted_wait_s(ahead: int, slots: int, call_s: float) -> float:
    """Seconds a new call waits before it runs with `ahead` calls before it (running and
    queued) on `slots` batch slots, each call taking `call_s` seconds: a queue of `slots`
    servers with deterministic service, where every full round of `slots` calls ahead beyond
    the free slots costs one `call_s` (0 while a slot is free)."""
    if slots <= 0:
        return math.inf
    if ahead < slots:
        return 0.0
    return ((ahead - slots) // slots + 1) * call_s


def schedule_app(
    ready: list[CallInfo],
    engines: list[EngineState],
    latency_cap: int | None = None,
    throughput_cap: int = 64,
    max_throughput_wait_s: float = 5.0,
    affinity_load_bound: int = 8,
    latency_tpot_s: float | None = None,
    latency_pack_slack: float | None = None,
) -> list[Placement]:
    """Application-centric placement (Parrot, OSDI 2024, §5.2 and §6).

    - Latency calls are admitted first and go to the engine with the smallest running batch
      among those that take them (`latency_admits`: under `latency_cap` calls, None: the
      engine's batch size, and within `latency_tpot_s` by the engine's step-time model); they
      wait when none does (the engine then also admits them before throughput work).
      With `latency_pack_slack` set and throughput work running or ready, latency work is
      kept apart from it: a latency call joins an engine with latency work while
      `packs_latency` holds, else goes where the least throughput work runs; throughput calls
      prefer engines without latency work (whose steps have no time budget).
    - Throughput calls fill engines up to `throughput_cap` running calls each, so batches are
      large. Members of a task group (a map stage) are dispatched together, onto the engine of
      the group's first member while it has room. Other calls balance load.
    - Any call that waited `max_throughput_wait_s` goes first (no starvation: a throughput
      call under a steady stream of latency calls, or a call of a program that has been served
      much, among fresher programs).
    - Within a class, calls of programs with less attained service go first (`admission_key`).
    - An engine holding one of the call's prefixes (or given a call with that prefix earlier in
      the same round) is preferred unless it runs more than `affinity_load_bound` calls beyond
      the least loaded eligible engine.
    - Engines without the free KV blocks a call needs are skipped while another has them.
    Deterministic: ties break by engine name. Calls that fit nowhere stay queued.
    """
    load = {e.name: e.running_calls for e in engines}
    lat = {e.name: e.running_latency for e in engines}
    lat_kv = {e.name: e.latency_kv_tokens for e in engines}
    free = {e.name: e.free_blocks for e in engines}
    group_engine: dict[int, str] = {}
    key_engine: dict[str, str] = {}
    out: list[Placement] = []
    apart = latency_pack_slack is not None and (
        any(e.running_calls > e.running_latency for e in engines)
        or any(c.objective != "latency" for c in ready)
    )
    for call in _admission_order(ready, max_throughput_wait_s):
        cands = eligible(call, engines)
        is_latency = call.objective == "latency"
        if is_latency:
            cands = [
                e
                for e in cands
                if latency_admits(e, call, lat[e.name], lat_kv[e.name], latency_cap, latency_tpot_s)
            ]
        else:
            cands = [e for e in cands if load[e.name] < throughput_cap]
        if not cands:
            continue
        roomy = [e for e in cands if free[e.name] >= _blocks_needed(call, e)]
        cands = roomy or cands
        least = min(load[e.name] for e in cands)
        affine = [
            e
            for e in cands
            if _holds_prefix(call, e, key_engine) and load[e.name] <= least + affinity_load_bound
        ]
        group = group_engine.get(call.task_group) if call.task_group is not None else None
        if affine:
            best = min(affine, key=lambda e: (load[e.name], e.name))
        elif group is not None and any(e.name == group for e in cands):
            best = next(e for e in cands if e.name == group)
        elif apart and is_latency:
            slack = latency_pack_slack or 0.0
            packed = [
                e for e in cands if packs_latency(e, call, lat[e.name], lat_kv[e.name], slack)
            ]
            # Least throughput work first; then join the most latency work when it packs,
            # else the least.
            sign = -1 if packed else 1
            keys = {
                e.name: (load[e.name] - lat[e.name], sign * lat[e.name], load[e.name], e.name)
                for e in packed or cands
            }
            best = next(e for e in cands if e.name == min(keys.values())[3])
        elif apart:
            best = min(cands, key=lambda e: (lat[e.name] > 0, load[e.name], e.name))
        else:
            best = min(cands, key=lambda e: (load[e.name], e.name))
        if call.task_group is not None:
            group_engine.setdefault(call.task_group, best.name)
        for k in call.prefix_keys:
            key_engine.setdefault(k, best.name)
        load[best.name] += 1
        lat[best.name] += int(is_latency)
        lat_kv[best.name] += (call.prompt_tokens + call.max_new_tokens) if is_latency else 0
        free[best.name] -= _blocks_needed(call, best)
        out.append(Placement(call.call_id, best.name))
    return out
