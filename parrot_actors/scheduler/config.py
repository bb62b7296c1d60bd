"""Scheduler configuration."""

from __future__ import annotations

import msgspec

from parrot_actors.errors import InvalidRequestError

POLICIES = ("app", "fcfs")


class SchedulerConfig(msgspec.Struct, kw_only=True):
    """How the scheduler places calls.

    policy: "app" (application-centric: objectives, task groups, prefix affinity; Parrot §5-6)
    or "fcfs" (first come, first served: the request-level baseline).
    prefix_sharing: fork shared prompt prefixes instead of recomputing them.
    automatic_prefix_caching: engines reuse cached full blocks by hash (vLLM/SGLang style):
    applies to every engine config that leaves `prefix_caching` unset (None: engines decide,
    on by default); an engine config that sets the opposite is an error, never overridden.
    latency_cap: at most this many running latency calls per engine (None: as many as the
    engine batches, `max_running`; the paper-era slot count, kept as an option).
    latency_tpot_s: an engine takes another latency call only while the predicted decode step
    of its latency calls stays within this many seconds (its step-time model; None: no time
    bound). latency_pack_slack: while throughput work runs, latency calls are packed on the
    engines already running latency work as long as their predicted decode step stays within
    this share of one call's alone, and throughput calls go to the other engines
    (`policy.packs_latency`; None: latency calls go to the smallest batch).
    throughput_cap: at most this many running calls per engine for throughput work.
    max_latency_wait_s: a latency request whose predicted wait (`Scheduler.admit`, from the
    engines' step-time models) is over this many seconds is refused with `OverloadedError`
    (HTTP 429, `Retry-After`) instead of joining a queue without bound (None: never refused);
    `tenant_max_latency_wait_s` overrides it per tenant. max_queued_throughput: throughput
    calls one tenant may have waiting (429 beyond).
    max_throughput_wait_s: a throughput call waiting longer than this is admitted regardless of
    waiting latency work (no starvation). static_prefix_cache: static prefixes kept after use.
    min_shared_tokens: token-level matching shares a common prefix at least this long.
    max_retries: times a call is re-run on another engine after its engine died
    (`EngineDiedError`) before any output was delivered; 0 fails it with the error instead.
    event_log_size / call_stats_size: how many of the latest scheduling events and finished
    calls' `CallStats` are kept (bounded rings, so a server that runs for weeks stays small).
    max_retained_contexts: contexts kept between the turns of programs (sessions), in all.
    max_programs: programs whose attained service is remembered (the least recently served
    are forgotten: they count as fresh again).
    """

    policy: str = "app"
    prefix_sharing: bool = True
    automatic_prefix_caching: bool | None = None
    latency_cap: int | None = None
    latency_tpot_s: float | None = None
    latency_pack_slack: float | None = 0.25
    throughput_cap: int = 64
    max_latency_wait_s: float | None = 60.0
    tenant_max_latency_wait_s: dict[str, float] = msgspec.field(default_factory=dict)
    max_queued_throughput: int = 4096
    max_throughput_wait_s: float = 5.0
    static_prefix_cache: int = 8
    min_shared_tokens: int = 64
    max_retries: int = 1
    event_log_size: int = 10_000
    call_stats_size: int = 10_000
    max_retained_contexts: int = 256
    max_programs: int = 65_536

    def validate(self) -> SchedulerConfig:
        """Return self or raise `InvalidRequestError` naming the bad field."""
        if self.policy not in POLICIES:
            raise InvalidRequestError(f"policy {self.policy!r}: allowed are {POLICIES}")
        if (self.latency_cap is not None and self.latency_cap <= 0) or self.throughput_cap <= 0:
            raise InvalidRequestError(
                f"latency_cap={self.latency_cap}, throughput_cap={self.throughput_cap}: must be > 0"
            )
        if self.latency_pack_slack is not None and not 0 <= self.latency_pack_slack < 100:
            raise InvalidRequestError(
                f"latency_pack_slack={self.latency_pack_slack!r}: must be in [0, 100), or None"
            )
        waits: dict[str, float | None] = {"latency_tpot_s": self.latency_tpot_s}
        waits["max_latency_wait_s"] = self.max_latency_wait_s
        for tenant, bound in self.tenant_max_latency_wait_s.items():
            waits[f"tenant_max_latency_wait_s[{tenant!r}]"] = bound
        for name, value in waits.items():
            if value is not None and not 0 < value < float("inf"):
                raise InvalidRequestError(f"{name}={value!r}: must be > 0 seconds, or None")
        for name in (
            "max_queued_throughput",
            "event_log_size",
            "call_stats_size",
            "max_retries",
            "max_retained_contexts",
            "max_programs",
        ):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name}={getattr(self, name)!r}: must be >= 0")
        return self
