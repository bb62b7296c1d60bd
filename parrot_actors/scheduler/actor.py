"""The scheduler actor: a thin async shell around the policy core.

It keeps the queue of ready calls, asks the policy where they go, and runs each placed call on
its engine (see `executor.run_call`). Calls for a model that no engine serves fail at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from parrot_actors.errors import CallError
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.scheduler.executor import CallStats, run_call
from parrot_actors.scheduler.policy import CallInfo, EngineState, eligible, schedule_fcfs
from parrot_actors.variables.graph import SemanticCall, get_perf_objective, prefix_hash


class Scheduler:
    """Places ready calls on engines and runs them.

    engines: objects with the engine API (`fill`, `generate`, `free_context`, `stats`, `name`,
    `model_name`). event_log: (event, call id, detail) tuples in order: "ready", "dispatch"
    (detail: engine name), "resolved" (an output; detail: its name; logged by the runtime),
    "done", "failed".
    """

    def __init__(self, engines: list, config: SchedulerConfig | None = None) -> None:
        self.config = (config or SchedulerConfig()).validate()
        self.engines = {e.name: e for e in engines}
        self.ready: dict[int, tuple[SemanticCall, float, int]] = {}
        self.running: dict[int, tuple[SemanticCall, str, asyncio.Task]] = {}
        self.call_stats: list[CallStats] = []
        self.event_log: list[tuple[str, int, str]] = []
        self._seq = itertools.count()
        self._ctx_ids = itertools.count()

    def enqueue(self, call: SemanticCall) -> None:
        """A call whose inputs are all resolved and whose output is wanted."""
        self.ready[call.id] = (call, time.perf_counter(), next(self._seq))
        self.event_log.append(("ready", call.id, ""))
        self.dispatch()

    def cancel(self, call: SemanticCall) -> None:
        """Drop a queued call, or cancel a running one (its engine work stops)."""
        self.ready.pop(call.id, None)
        running = self.running.get(call.id)
        if running is not None:
            running[2].cancel()

    def engine_states(self) -> list[EngineState]:
        """A snapshot of every engine for the policy."""
        states = []
        for name, engine in self.engines.items():
            mine = [c for c, e, _ in self.running.values() if e == name]
            s = engine.stats()
            states.append(
                EngineState(
                    name=name,
                    model=engine.model_name,
                    running_calls=len(mine),
                    running_latency=sum(get_perf_objective(c) == "latency" for c in mine),
                    free_blocks=s.kv_blocks_total - s.kv_blocks_used,
                    block_size=s.block_size,
                )
            )
        return states

    def _info(self, call: SemanticCall, ready_at: float, seq: int, now: float) -> CallInfo:
        static, dynamic = prefix_hash(call)
        sampling = [
            dict(p.sampling).get("max_tokens", 64) for p in call.pieces if p.kind == "output"
        ]
        return CallInfo(
            call_id=call.id,
            objective=get_perf_objective(call),
            seq=seq,
            task_group=call.task_group,
            prefix_keys=tuple(k for k in (static, dynamic) if k),
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
        infos = [self._info(c, t, s, now) for c, t, s in self.ready.values()]
        for info in infos:
            if not eligible(info, states):
                call = self.ready.pop(info.call_id)[0]
                served = sorted({s.model for s in states})
                self._fail(
                    call,
                    CallError(
                        f"{call.function_name}#{call.id} needs model "
                        f"{call.model!r}; the engines serve {served}"
                    ),
                )
        for placement in schedule_fcfs([i for i in infos if i.call_id in self.ready], states):
            call, ready_at, _ = self.ready.pop(placement.call_id)
            self._start(call, placement.engine, ready_at)

    def _fail(self, call: SemanticCall, error: CallError) -> None:
        call.state = "failed"
        self.event_log.append(("failed", call.id, str(error)))
        for out in call.outputs:
            out._fail(error)

    def _start(self, call: SemanticCall, engine_name: str, ready_at: float) -> None:
        call.state = "running"
        self.event_log.append(("dispatch", call.id, engine_name))
        stats = CallStats(
            call_id=call.id,
            function=call.function_name,
            engine=engine_name,
            objective=get_perf_objective(call),
        )
        ctx = f"call{call.id}-{next(self._ctx_ids)}"
        task = asyncio.get_running_loop().create_task(
            run_call(call, self.engines[engine_name], stats, ready_at, ctx)
        )
        self.running[call.id] = (call, engine_name, task)
        task.add_done_callback(lambda _t, c=call, st=stats: self._finished(c, st))

    def _finished(self, call: SemanticCall, stats: CallStats) -> None:
        self.running.pop(call.id, None)
        self.call_stats.append(stats)
        self.event_log.append(("done" if call.state == "done" else "failed", call.id, ""))
        if call.state != "done":
            for out in call.outputs:
                if not out.done():
                    self._fail(call, CallError(f"{call.function_name}#{call.id} was cancelled"))
                    break
        self.dispatch()

    async def close(self) -> None:
        """Cancel running calls and wait for them to release their contexts."""
        tasks = [t for _, _, t in self.running.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
