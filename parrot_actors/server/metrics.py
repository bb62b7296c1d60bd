"""Prometheus metrics of the service (text format at GET /metrics).

Request counts and latencies are recorded by a middleware; engine counters (tokens, KV blocks,
queue lengths) and scheduler queues are read from the live objects at scrape time, so they are
never stale. Each app has its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from parrot_actors import clock
from parrot_actors.runtime import Runtime

_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

_ENGINE_COUNTERS = {
    "prefill_tokens": "tokens whose KV the engine computed",
    "reused_tokens": "tokens whose KV came from a fork or the prefix cache",
    "generated_tokens": "tokens sampled",
    "preemptions": "running requests preempted for recomputation",
    "evictions": "idle contexts whose KV was dropped under KV pressure",
    "steps": "engine steps (forward passes)",
    "restarts": "rebuilds of the engine after its loop failed",
}
_ENGINE_GAUGES = {
    "up": "1 while the engine serves, 0 while it is down (between a failure and its rebuild)",
    "kv_blocks_used": "KV blocks in use",
    "kv_blocks_total": "KV blocks in the pool",
    "running": "requests in the running batch",
    "waiting": "requests queued in the engine",
    "contexts": "live contexts",
}


class _LiveCollector:
    """Reads engine stats, scheduler queues and the session count when scraped."""

    def __init__(self, runtime: Runtime, sessions: Callable[[], int]) -> None:
        self.runtime = runtime
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        stats = [e.stats() for e in self.runtime.engines]
        for field, doc in _ENGINE_COUNTERS.items():
            counter = CounterMetricFamily(f"parrot_engine_{field}", doc, labels=["engine"])
            for s in stats:
                counter.add_metric([s.name], getattr(s, field))
            yield counter
        for field, doc in _ENGINE_GAUGES.items():
            gauge = GaugeMetricFamily(f"parrot_engine_{field}", doc, labels=["engine"])
            for s in stats:
                gauge.add_metric([s.name], int(s.healthy) if field == "up" else getattr(s, field))
            yield gauge
        fit = GaugeMetricFamily(
            "parrot_engine_step_time",
            "the engine's step-time model: fitted seconds per feature unit, samples and "
            "relative error of the fit (real engines); simulated seconds (simulated engines)",
            labels=["engine", "quantity"],
        )
        for s in stats:
            for quantity, value in sorted(s.step_time.items()):
                fit.add_metric([s.name, quantity], value)
        yield fit
        scheduler = self.runtime.scheduler  # None until the runtime starts
        yield GaugeMetricFamily(
            "parrot_scheduler_ready_calls",
            "calls ready and waiting for an engine",
            value=len(scheduler.ready) if scheduler is not None else 0,
        )
        yield GaugeMetricFamily(
            "parrot_scheduler_running_calls",
            "calls running on engines",
            value=len(scheduler.running) if scheduler is not None else 0,
        )
        retention = scheduler.retention if scheduler is not None else None
        yield GaugeMetricFamily(
            "parrot_retained_contexts",
            "contexts kept on engines for their session's next request",
            value=len(retention) if retention is not None else 0,
        )
        yield GaugeMetricFamily(
            "parrot_retained_tokens",
            "token ids held by retained contexts",
            value=retention.tokens if retention is not None else 0,
        )
        yield GaugeMetricFamily("parrot_sessions", "live sessions", value=self.sessions())


class Metrics:
    """The service's metrics: request counters and latency histograms (seconds), OpenAI token
    counters, variable wait times, the live engine/scheduler/session gauges (engine health:
    `parrot_engine_up`, `parrot_engine_restarts_total`), and the process's own (memory, CPU)."""

    def __init__(self, runtime: Runtime, sessions: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "parrot_http_requests",
            "HTTP requests answered",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "parrot_http_request_seconds",
            "HTTP request latency (until the handler returns; streams until their end)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "parrot_openai_tokens",
            "tokens of OpenAI-compatible requests",
            ["kind"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "parrot_openai_ttft_seconds",
            "time to first token of OpenAI-compatible requests",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.variable_wait = Histogram(
            "parrot_variable_wait_seconds",
            "server-side wait of GET /v1/variables/{id}",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(runtime, sessions))
        # process_resident_memory_bytes and friends: a server that runs for weeks is watched
        # for growth (Linux only; elsewhere the collector exports nothing).
        ProcessCollector(registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware(self) -> Middleware:
        """An aiohttp middleware counting requests by route template (not raw path, so random
        paths cannot blow up the label set), method and status, and timing them."""

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            start = clock.now()
            status = 500
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                route = _route_of(request)
                method = request.method if request.method in _METHODS else "OTHER"
                self.requests.labels(route, method, str(status)).inc()
                self.latency.labels(route).observe(clock.now() - start)

        return record


def _route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
