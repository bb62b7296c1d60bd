"""The scheduler's policy core: synchronous and deterministic, no asyncio, no tensors.

`schedule(ready_calls, engine_states) -> placements`. The actor feeds it snapshots and carries
out its placements.
"""

from __future__ import annotations

import msgspec


class CallInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy knows of a ready call.

    objective: "latency" or "throughput". task_group: id shared by a map stage, or None.
    prefix_keys: static/dynamic prefix keys (may be empty). prompt_tokens / max_new_tokens:
    sizes in tokens (estimates). model: required model name or None. seq: arrival order.
    waited_s: seconds since the call became ready.
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


class EngineState(msgspec.Struct, kw_only=True):
    """What the policy knows of an engine: its served model, running calls (all / latency),
    running tokens, free KV blocks (and block size) and the prefix keys it holds."""

    name: str
    model: str
    running_calls: int = 0
    running_latency: int = 0
    running_tokens: int = 0
    free_blocks: int = 0
    block_size: int = 16
    prefixes: tuple[str, ...] = ()


class Placement(msgspec.Struct, frozen=True):
    """Run call `call_id` on engine `engine`."""

    call_id: int
    engine: str


def eligible(call: CallInfo, engines: list[EngineState]) -> list[EngineState]:
    """Engines that serve the call's model (all engines when it names none)."""
    if call.model is None:
        return list(engines)
    return [e for e in engines if e.model == call.model]


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
