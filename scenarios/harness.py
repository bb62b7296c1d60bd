"""Running one scenario in one mode: an in-process service, the clients, the counters.

Each mode gets a fresh service (`BackgroundServer`: its own event loop in a thread, listening
on a free 127.0.0.1 port) over the same model, so neither mode inherits the other's caches.
Parrot: `pa.SchedulerConfig()` (the application-centric policy, prefix sharing). Baseline:
`pa.SchedulerConfig(policy="fcfs", prefix_sharing=False, automatic_prefix_caching=...)` and the
OpenAI-compatible endpoint. With `--url` both modes use that running service instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import msgspec
import openai

import parrot_actors as pa
from parrot_actors import clock, simtime
from parrot_actors.engines.engine import EngineConfig
from parrot_actors.engines.sim import SimConfig
from parrot_actors.server import BackgroundServer, ServerConfig
from parrot_actors.server.app import Server, package_version, start_server
from scenarios import peer
from scenarios.context import RunContext
from scenarios.records import CallRecord, ModeResult, TokenStats

T = TypeVar("T")

TINY_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
}
"""A 2-layer random-weight Llama on the real tokenizer (CI: fast, deterministic greedy text)."""

LATENCY_TUNED = {"max_running": 2, "max_batch_tokens": 512}
"""Engine settings of the latency-tuned baseline: small batches (Parrot §8.4: the
latency-centric vLLM configuration, scaled to this engine)."""
THROUGHPUT_TUNED = {"max_running": 64, "max_batch_tokens": 4096}
"""Engine settings of the throughput-tuned baseline: large batches and prefill chunks."""
_TUNINGS = {"latency": LATENCY_TUNED, "throughput": THROUGHPUT_TUNED}

SIM_LATENCY_TUNED = {"kv_tokens": 4096}
"""The paper's latency-tuned vLLM (`../shared/paper_figures.md`, common setup): KV cache capped
at 4096 tokens (7096 in Fig. 17: `--sim-latency-kv-tokens`), so batches stay small."""
SIM_THROUGHPUT_TUNED = {"max_batch_tokens": 8000}
"""The paper's throughput-tuned vLLM: KV uncapped, `--max-num-batched-tokens 8000`."""
SIM_MAX_RUNNING = 256
"""Sequences per step of a simulated engine: vLLM's default `max_num_seqs`."""
SIM_MAX_BATCH_TOKENS = 8192
"""Tokens per step of a simulated engine (Parrot and the "same" baseline)."""


@dataclass
class ModeSpec:
    """One mode to run: label (table column), mode ("parrot" | "baseline": which service),
    engine configs and scheduler config of its service, and the client variant of a
    scenario that has several (its `VARIANTS`; "" otherwise)."""

    label: str
    mode: str
    engines: list[EngineConfig]
    scheduler: pa.SchedulerConfig
    variant: str = ""


def engine_configs(args: argparse.Namespace, tuning: dict | None = None) -> list[EngineConfig]:
    """`args.engines` engine configs: simulated GPUs with `--sim`, the tiny random model with
    `--tiny`, else `--model`; `--max-running` / `--max-batch-tokens` unless `tuning` overrides
    them."""
    if args.sim:
        return _sim_configs(args, tuning)
    kw: dict = {
        "max_running": args.max_running or getattr(args, "cpu_max_running", None) or 64,
        "max_batch_tokens": args.max_batch_tokens or 2048,
        "kv_cache_bytes": int(args.kv_cache_mb * (1 << 20)),
        "device": args.device,
        "dtype": args.dtype,
        "cascade": not getattr(args, "no_cascade", False),
    }
    kw.update(_slack(args))
    kw.update(tuning or {})
    if args.tiny:
        kw["random_model"] = dict(TINY_MODEL)
    else:
        kw["model"] = args.model
    return [EngineConfig(name=f"engine{i}", **kw) for i in range(max(1, args.engines))]


def _slack(args: argparse.Namespace) -> dict:
    """`--latency-step-slack`, when given, as engine config fields."""
    slack = getattr(args, "latency_step_slack", None)
    return {} if slack is None else {"latency_step_slack": slack}


def _sim_configs(args: argparse.Namespace, tuning: dict | None) -> list[EngineConfig]:
    """Simulated engines (`SimConfig` from the `--sim*` flags); `tuning` may cap the KV cache
    (`kv_tokens`) or set engine fields."""
    tuning = dict(tuning or {})
    kv_tokens = tuning.pop("kv_tokens", None)
    cpu = args.sim == "cpu-fitted"
    kv_gb = args.sim_kv_gb
    if cpu and kv_gb is None:  # the CPU engine's own KV budget, as in the run it stands for
        kv_gb = args.kv_cache_mb * (1 << 20) / 1e9
    sim = SimConfig(
        gpu=args.sim,
        model=args.sim_model,
        dtype=args.sim_dtype,
        kv_cache_gb=kv_gb,
        tensor_parallel=args.sim_tp,
        fit=args.sim_fit,
        kv_tokens=kv_tokens,
        tokenizer=getattr(args, "sim_tokenizer", None) or "default",
    )
    # A fitted CPU engine keeps the CPU engine's sizes, so that it stands for that engine.
    running = (getattr(args, "cpu_max_running", None) or 64) if cpu else SIM_MAX_RUNNING
    kw: dict = {
        "max_running": args.max_running or running,
        "max_batch_tokens": args.max_batch_tokens or (2048 if cpu else SIM_MAX_BATCH_TOKENS),
        "device": "sim",
        "sim": sim,
        "cascade": not getattr(args, "no_cascade", False),
    }
    if cpu:
        kw["throughput_step_tokens"] = 64  # the CPU engine's "auto"
        kw["latency_step_slack"] = 0.25  # the CPU engine's "auto"
    kw.update(_slack(args))
    kw.update(tuning)
    return [EngineConfig(name=f"engine{i}", **kw) for i in range(max(1, args.engines))]


def _tunings(args: argparse.Namespace) -> dict[str, dict]:
    if not args.sim:
        return _TUNINGS
    latency = dict(SIM_LATENCY_TUNED)
    latency["kv_tokens"] = getattr(args, "sim_latency_kv_tokens", None) or latency["kv_tokens"]
    return {"latency": latency, "throughput": SIM_THROUGHPUT_TUNED}


def _baseline_engines(args: argparse.Namespace, tuning: dict | None) -> list[EngineConfig]:
    """The baseline's engine configs for `tuning`. A simulated GPU baseline stands for the
    paper's vLLM, whose PagedAttention decode reads a shared cached prefix once per request
    (the gap Parrot's Fig. 14-15 measure), so its engines run without the shared-prefix
    (cascade) kernel unless `--baseline-cascade`; real engines and `--sim cpu-fitted` (which
    stands for our CPU engine) keep the engines' own kernel in both modes."""
    tuning = dict(tuning or {})
    vllm = args.sim and args.sim != "cpu-fitted"
    if vllm and not getattr(args, "baseline_cascade", False):
        tuning["cascade"] = False
    return engine_configs(args, tuning)


def mode_specs(
    args: argparse.Namespace, tunings: list[str], variants: list[tuple[str, str, str]] | None = None
) -> list[ModeSpec]:
    """The modes `args.mode` asks for: Parrot, and one baseline per tuning in `tunings`
    ("same": Parrot's engine settings; "latency" / "throughput": `LATENCY_TUNED` /
    `THROUGHPUT_TUNED`). A scenario with client `variants` ((label, mode, tuning) triples)
    gets one mode per variant instead, each on a service of its mode and engine tuning.
    `--parrot-no-sharing`: Parrot's mode without forking shared prefixes (Fig. 17's "without
    sharing"); `--no-cascade`: engines without the shared-prefix decode kernel (Fig. 16's
    "Parrot with PagedAttention only"). Raises `ValueError` for `--baseline-url` with `--sim`
    (a real server runs in real time), before any mode runs."""
    external = getattr(args, "baseline_url", None)
    if external and args.sim:  # refused before any mode runs
        raise ValueError(
            f"--baseline-url {external} is a real server and runs in real time; it cannot be "
            f"the baseline of a simulated run (--sim {args.sim}): drop one of the two"
        )
    sharing = not getattr(args, "parrot_no_sharing", False)
    parrot = pa.SchedulerConfig(
        throughput_cap=args.throughput_cap,
        latency_cap=getattr(args, "latency_cap", None),
        latency_tpot_s=getattr(args, "latency_tpot", None),
        prefix_sharing=sharing,
        automatic_prefix_caching=None if sharing else False,  # no reuse of any kind
        max_latency_wait_s=None,  # the figures measure queueing delay, as the paper's do
    )
    base = pa.SchedulerConfig(
        policy="fcfs",
        prefix_sharing=False,
        automatic_prefix_caching=args.baseline_apc,
        max_latency_wait_s=None,
    )
    if variants and external:  # one baseline client drives that server, tuned as its owner runs it
        first = next(v for v in variants if v[1] == "baseline")
        variants = [v for v in variants if v[1] == "parrot" or v == first]
    if variants:
        return [
            ModeSpec(
                label,
                mode,
                (engine_configs if mode == "parrot" else _baseline_engines)(
                    args, _tunings(args).get(tuning)
                ),
                parrot if mode == "parrot" else base,
                label,
            )
            for label, mode, tuning in variants
            if args.mode in (mode, "both")
        ]
    if external:
        tunings = tunings[:1]
    specs = []
    if args.mode in ("parrot", "both"):
        specs.append(ModeSpec("parrot", "parrot", engine_configs(args), parrot))
    if args.mode in ("baseline", "both"):
        for t in tunings:
            tuning = _tunings(args).get(t)
            label = "baseline" if t == "same" or external else f"baseline-{t}"
            specs.append(ModeSpec(label, "baseline", _baseline_engines(args, tuning), base))
    return specs


def run_mode(
    spec: ModeSpec, scenario: ModuleType, args: argparse.Namespace, progress: bool = True
) -> ModeResult:
    """Run `scenario` once in `spec`'s mode (its own service unless `args.url`) and return
    what it measured. The baseline mode drives `args.baseline_url` instead when given (any
    OpenAI-compatible server: `peer`). Raises what the scenario raises (e.g. `pa.CallError`,
    `openai` errors) and `TimeoutError` when the run takes longer than `args.timeout`
    seconds."""
    external = getattr(args, "baseline_url", None) if spec.mode == "baseline" else None
    if external or args.url:
        url = (external or args.url).rstrip("/")
        return asyncio.run(_drive(spec, scenario, args, url, None, progress))
    if args.sim:
        charge = (args.sim_host or ("charge" if args.sim == "cpu-fitted" else "report")) == "charge"
        return simtime.run(_simulated(spec, scenario, args, progress), charge_host=charge)
    server = BackgroundServer(
        spec.engines,
        ServerConfig(port=0, max_pending_calls=100_000, default_get_timeout_s=3600.0),
        spec.scheduler,
        start_timeout_s=600.0,
    ).start()
    try:
        return asyncio.run(_drive(spec, scenario, args, server.url, server, progress))
    finally:
        server.stop()


async def _simulated(
    spec: ModeSpec, scenario: ModuleType, args: argparse.Namespace, progress: bool
) -> ModeResult:
    """One mode in simulated time: the service and the clients on this one `SimEventLoop`
    (HTTP over loopback as in a real run); the result's `extra` gets the wall time, the
    host-side work (`host_busy_s`: wall seconds the loop ran our code) and whether it was
    charged to simulated time (`host_charged`: 1.0) or only reported beside it (0.0)."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, simtime.SimEventLoop)
    wall0, busy0 = time.perf_counter(), loop.host_busy_s
    server = await start_server(
        spec.engines,
        ServerConfig(port=0, max_pending_calls=100_000, default_get_timeout_s=86400.0),
        spec.scheduler,
    )
    try:
        result = await _drive(spec, scenario, args, server.url, server, progress)
        result.extra.update(_sim_engine_extra(server))
    finally:
        await server.close()
    result.extra["wall_s"] = round(time.perf_counter() - wall0, 3)
    result.extra["host_busy_s"] = round(loop.host_busy_s - busy0, 3)
    result.extra["host_charged"] = float(loop.charge_host)
    return result


def _sim_engine_extra(server: Server) -> dict[str, float]:
    """What the simulated engines did over the mode's run (warm-up request included), for
    `ModeResult.extra`: steps and preemptions summed over engines (`sim_steps`,
    `sim_preemptions`, `sim_evictions`), sequences per step weighted by steps
    (`sim_mean_batch_size`), the largest batch (`sim_max_batch_size`), and the busiest
    engine's predicted step seconds (`sim_busy_s_max`), and the most KV blocks one engine held
    at once (`sim_kv_blocks_peak`, of `sim_kv_blocks_total` per engine, block_size tokens each)."""
    stats = [e.stats() for e in server.runtime.engines]
    steps = sum(s.steps for s in stats)
    return {
        "sim_steps": float(steps),
        "sim_preemptions": float(sum(s.preemptions for s in stats)),
        "sim_evictions": float(sum(s.evictions for s in stats)),
        "sim_mean_batch_size": (
            round(sum(s.mean_batch_size * s.steps for s in stats) / steps, 3) if steps else 0.0
        ),
        "sim_max_batch_size": float(max((s.max_batch_size for s in stats), default=0)),
        "sim_kv_blocks_peak": float(max((s.kv_blocks_peak for s in stats), default=0)),
        "sim_kv_blocks_total": float(max((s.kv_blocks_total for s in stats), default=0)),
        "sim_block_size": float(stats[0].block_size if stats else 0),
        "sim_busy_s_max": round(
            max((s.step_time.get("simulated_s", 0.0) for s in stats), default=0.0), 3
        ),
    }


async def _on_server(server: BackgroundServer | Server, read: Callable[[], Awaitable[T]]) -> T:
    """`read()` on the server's event loop: this one for an in-loop server (simulated runs),
    else the background server's thread."""
    if isinstance(server, Server):
        return await read()
    return await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(read(), server.loop), loop=asyncio.get_running_loop()
    )


async def _call_stats(server: BackgroundServer | Server) -> list:
    async def read() -> list:
        return server.runtime.call_stats()

    return await _on_server(server, read)


async def _warmup_ids(server: BackgroundServer | Server | None) -> set[int]:
    """Ids of the calls the service finished before the run (the warm-up request), whose
    stats may land just after its answer: waits up to 5 s for them."""
    if server is None:
        return set()
    for _ in range(100):
        stats = await _call_stats(server)
        if stats:
            return {s.call_id for s in stats}
        await asyncio.sleep(0.05)
    return set()


async def _engine_counters(url: str, server: BackgroundServer | Server | None) -> TokenStats:
    """The service's engine counters summed over its engines: read in process when the
    service is ours, else from its Prometheus /metrics (ours, vLLM's or SGLang's: `peer`; a
    session's /v1/stats shows only that session's own calls). A server without /metrics gives
    `source` "n/a"."""
    if server is not None:

        async def read() -> TokenStats:
            engines = [e.stats() for e in server.runtime.engines]
            return TokenStats(**{c: sum(getattr(e, c) for e in engines) for c in peer.COUNTERS})

        return await _on_server(server, read)
    import aiohttp

    key = os.environ.get("PARROT_ACTORS_METRICS_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=30.0)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(url + "/metrics", headers=headers) as r:
            if r.status != 200:
                return TokenStats(source="n/a")
            text = await r.text()
    try:
        return peer.parse_counters(text)
    except ValueError:
        return TokenStats(source="n/a")


async def _server_identity(url: str, owned_by: str, model: str) -> dict[str, str]:
    """Name and version of the server at `url` (`peer.server_name` of its GET /version,
    which a server may lack), with its url and the model asked for."""
    import aiohttp

    body: object = None
    try:
        timeout = aiohttp.ClientTimeout(total=30.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(url + "/version") as r:
                if r.status == 200:
                    body = await r.json(content_type=None)
    except (aiohttp.ClientError, ValueError):
        body = None
    return peer.server_name(body, owned_by) | {"url": url, "model": model}


def _parrot_call(s: object) -> CallRecord:
    # CallStats.ttft_s runs to the end of the first output; minus its decode time it is the
    # time to the first token, measured from dispatch (queue_s covers ready -> dispatch).
    first = max(0.0, s.ttft_s - s.decode_s)
    n = s.completion_tokens
    return CallRecord(
        name=s.function,
        queue_s=s.queue_s,
        ttft_s=s.queue_s + first,
        e2e_s=s.e2e_s,
        tpot_s=s.decode_s / (n - 1) if n > 1 else 0.0,
        prompt_tokens=s.prompt_tokens,
        completion_tokens=n,
    )


async def _drive(
    spec: ModeSpec,
    scenario: ModuleType,
    args: argparse.Namespace,
    url: str,
    server: BackgroundServer | Server | None,
    progress: bool,
) -> ModeResult:
    from tqdm import tqdm

    from parrot_actors.engines.model_loader import load_tokenizer

    client = openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600.0
    )
    models = await client.models.list()
    external = spec.mode == "baseline" and getattr(args, "baseline_url", None)
    model = (external and getattr(args, "baseline_model", None)) or models.data[0].id
    identity = (
        await _server_identity(url, models.data[0].owned_by, model)
        if server is None
        else {
            "name": "parrot_actors",
            "version": package_version(),
            "url": "in-process",
            "model": model,
        }
    )
    if server is not None:
        tokenizer = server.runtime.engines[0].tokenizer
    else:
        tokenizer = load_tokenizer("default" if args.tiny else args.model)
    # One short request first: the first forward pass of a fresh engine pays one-off costs.
    await client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)
    warmup = await _warmup_ids(server)
    bar = tqdm(
        total=scenario.num_apps(args), desc=f"{scenario.NAME} [{spec.label}]", disable=not progress
    )
    ctx = RunContext(
        mode=spec.mode,
        url=url,
        rtt_s=args.rtt,
        rtt_dist=getattr(args, "rtt_dist", "fixed"),
        seed=args.seed,
        model=model,
        tokenizer=tokenizer,
        variant=spec.variant,
    )
    ctx.bar, ctx.openai = bar, client
    # Only Parrot's mode speaks the Parrot API: a baseline server may be anyone's.
    async with contextlib.AsyncExitStack() as stack:
        rt = None
        if spec.mode == "parrot":
            rt = await stack.enter_async_context(
                pa.Runtime.connect(url, max_connections=512, get_timeout_s=3600.0)
            )
        before = await _engine_counters(url, server)
        load0 = os.getloadavg()[0]
        ctx.t0 = clock.now()
        timeout = args.timeout or (86400.0 if args.sim else 1800.0)
        if spec.variant:
            run = scenario.run
        else:
            run = scenario.run_parrot if ctx.parrot else scenario.run_baseline
        try:
            await asyncio.wait_for(run(ctx, args), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{scenario.NAME} [{spec.label}] did not finish within --timeout "
                f"{timeout:g} s ({len(ctx.apps)} apps done)"
            ) from None
        wall = ctx.now()
        if rt is not None:
            await rt.flush()
        after = await _engine_counters(url, server)
    bar.close()
    await client.close()
    calls = ctx.calls
    # Parrot's calls (and every call of a variant scenario, whose clients are libraries) are
    # timed by the service's scheduler; the baseline's by its client.
    if (ctx.parrot or spec.variant) and server is not None:
        calls = [_parrot_call(s) for s in await _call_stats(server) if s.call_id not in warmup]
    engine = msgspec.to_builtins(spec.engines[0])
    engine.pop("random_model", None)
    if external:  # its engine settings are that server's own, unknown here
        engine = {"external": url}
    return ModeResult(
        label=spec.label,
        engine=engine | {"count": len(spec.engines)},
        scheduler=msgspec.to_builtins(spec.scheduler),
        wall_s=wall,
        round_trips=ctx.round_trips,
        apps=sorted(ctx.apps, key=lambda a: a.app),
        calls=calls,
        tokens=peer.difference(before, after),
        outputs=dict(sorted(ctx.outputs.items())),
        load=(load0, os.getloadavg()[0]),
        extra=dict(ctx.extra),
        server=identity,
    )
