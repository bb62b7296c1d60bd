"""What a scenario run measures: one record per application instance and per LLM call.

Times are seconds; token counts are tokens. App records come from the client (arrival to last
output, network round trips included); call records from the client for the baseline (send to
last streamed token) and from the service's scheduler for Parrot (ready to done).
"""

from __future__ import annotations

import msgspec


class AppRecord(msgspec.Struct, kw_only=True):
    """One application instance (a chain, a map-reduce job, a user query, a multi-agent run).

    kind: its class in the scenario (e.g. "chain", "chat", "background"). arrival_s: when it
    was due, from the start of the mode's run. e2e_s: arrival to its last output.
    output_tokens: tokens of its final output(s), counted with the model's tokenizer.
    """

    app: int
    kind: str
    arrival_s: float
    e2e_s: float
    output_tokens: int
    calls: int


class CallRecord(msgspec.Struct, kw_only=True):
    """One LLM call. name: its function (Parrot) or request name (baseline). queue_s: ready to
    dispatched (Parrot only; 0 for the baseline, whose queueing is inside e2e_s). ttft_s: to
    the first token; e2e_s: to the last; tpot_s: per output token after the first (0 for
    one-token outputs)."""

    name: str
    app: int = -1
    queue_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    tpot_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TokenStats(msgspec.Struct, kw_only=True):
    """Engine counters over one mode's run (after minus before, all engines): prefill tokens
    computed, tokens reused (forked or cached prefixes), tokens generated, engine steps.
    source: where they came from: "parrot_actors" (ours), "vllm" or "sglang" (a foreign
    baseline's /metrics), or "n/a" (a server that exposes none: every count 0, shown as n/a)."""

    prefill_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    source: str = "parrot_actors"


class ModeResult(msgspec.Struct, kw_only=True):
    """Everything one mode measured. label: "parrot", "baseline", "baseline-latency" or
    "baseline-throughput". engine: the engine settings used. wall_s: the run's makespan.
    outputs: every call's output text by a key that is the same in both modes. load: the
    machine's 1-minute load average before and after the run (other processes' load shows
    here: the CPU is shared). extra: counters the scenario kept (named in its module).
    server: the server this mode measured: "name" and "version" (from its `GET /version`),
    "url" ("in-process" for the mode's own service) and "model" (the model it was asked for)."""

    label: str
    engine: dict
    scheduler: dict
    wall_s: float
    round_trips: int
    apps: list[AppRecord]
    calls: list[CallRecord]
    tokens: TokenStats
    outputs: dict[str, str]
    load: tuple[float, float] = (0.0, 0.0)
    extra: dict[str, float] = {}
    server: dict[str, str] = {}
