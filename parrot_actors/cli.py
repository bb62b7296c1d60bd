"""The `parrot-actors` command line.

  parrot-actors serve [--model M] [--engines N] [--host H] [--port P]   run the service
  parrot-actors serve --sim a100 --sim-model llama-3-8b   the service on simulated GPUs
  parrot-actors demo [--url URL]        WriteSnakeGame and a map-reduce summary
  parrot-actors run APP.py [--url URL] [-- ARGS]   run the async `main` of your app
  parrot-actors chaos --url URL [--minutes M]      random aborts and bad inputs, then a table

Without --url, `demo` and `run` start an embedded runtime in this process (`--model` and the
other engine options choose its engines); with --url they use a running service through
`pa.Runtime.connect(URL)`, so the same app runs either way unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from parrot_actors.engines.api import EngineClient
    from parrot_actors.engines.engine import EngineConfig
    from parrot_actors.runtime import Runtime
    from parrot_actors.server.client import RemoteRuntime

METRICS_KEY_ENV = "PARROT_ACTORS_METRICS_KEY"
"""Environment variable holding the key of /health and /metrics (`serve --metrics-key`)."""


class _ModelOptions(TypedDict, total=False):
    """`EngineConfig` fields that only some engine options set."""

    random_model: dict[str, Any]
    kv_cache_bytes: int
    compile: bool | None


def engine_specs(args: argparse.Namespace) -> list[EngineConfig | EngineClient]:
    """Engines from the engine options: `--model echo` gives fake EchoEngines (no model; for
    tries and tests), anything else `EngineConfig`s (`--engines` of them)."""
    n = max(1, args.engines)
    if args.model == "echo":
        from parrot_actors.engines.echo import EchoEngine

        return [EchoEngine(name=f"echo{i}") for i in range(n)]
    from parrot_actors.engines.engine import EngineConfig

    if args.sim:
        from parrot_actors.engines.sim import SimConfig

        sim = SimConfig(
            gpu=args.sim,
            model=args.sim_model,
            kv_cache_gb=args.sim_kv_gb,
            tensor_parallel=args.sim_tp,
            fit=args.sim_fit,
        )
        return [
            EngineConfig(name=f"engine{i}", device="sim", sim=sim, max_running=256)
            for i in range(n)
        ]
    extra: _ModelOptions = {}
    if args.random_model:
        extra["random_model"] = json.loads(args.random_model)
    if args.kv_cache_mb:
        extra["kv_cache_bytes"] = int(args.kv_cache_mb * (1 << 20))
    if args.compile is not None:
        extra["compile"] = args.compile
    return [
        EngineConfig(
            name=f"engine{i}", model=args.model, device=args.device, dtype=args.dtype, **extra
        )
        for i in range(n)
    ]


def open_runtime(args: argparse.Namespace) -> Runtime | RemoteRuntime:
    """`pa.connect(--url)` (`pa.Runtime.connect`), or an embedded `pa.Runtime` over
    `engine_specs(args)`."""
    import parrot_actors as pa

    if args.url:
        return pa.connect(args.url, api_key=args.api_key)
    return pa.Runtime(engines=engine_specs(args))


def _demo_runtime(args: argparse.Namespace) -> Runtime | RemoteRuntime:
    """`open_runtime(args)`, except that embedded engines run without automatic prefix
    caching: the request-level comparison runs the same prompts after Parrot's run on the
    same engines and must not find their KV cached by hash. So the baseline reuses nothing
    (its scheduler forks nothing either), and Parrot's reused tokens are its own forks."""
    import parrot_actors as pa

    if args.url:
        return open_runtime(args)
    return pa.Runtime(
        engines=engine_specs(args),
        scheduler=pa.SchedulerConfig(automatic_prefix_caching=False),
    )


async def demo(args: argparse.Namespace) -> None:
    """The main job: WriteSnakeGame and a map-reduce summary, embedded or against --url.
    Embedded, it then runs both apps the request-level way on the same engines and prints
    one comparison line per app (times in seconds, prefill tokens computed / reused, the
    speedup) and one summary line per engine (`demo_compare`)."""
    import parrot_actors as pa
    from parrot_actors import apps
    from parrot_actors import demo_compare as dc
    from parrot_actors.runtime import RuntimeStats

    if args.url:
        print(f"Connecting to the service at {args.url} ...")
    elif args.model == "default":
        print("Starting the embedded runtime (SmolLM2-135M-Instruct; the first run converts it)...")
    async with _demo_runtime(args) as rt:
        local = rt if isinstance(rt, pa.Runtime) else None
        parrot: dict[str, dc.RunNumbers] = {}

        def snapshot() -> RuntimeStats | None:
            return local.stats() if local is not None else None

        def finish(app: str, before: RuntimeStats | None, t0: float) -> None:
            seconds = time.perf_counter() - t0
            print(f"[end-to-end {seconds:.2f}s]")
            if local is not None and before is not None:
                parrot[app] = dc.run_numbers(before, local.stats(), seconds)

        # Parrot runs first, on engines nothing ran on yet (a cold start, if anything, is
        # Parrot's cost, not the baseline's).
        before, t0 = snapshot(), time.perf_counter()
        code, test = apps.snake_game()
        print(f"\n=== WriteSnakeGame ===\n--- code ---\n{await code.get(perf=pa.LATENCY)}")
        print(f"--- test ---\n{await test.get(perf=pa.LATENCY)}")
        finish(dc.SNAKE, before, t0)

        title, text = apps.demo_document(args.document)
        parts = apps.chunk_words(text, args.chunks, args.words)
        before, t0 = snapshot(), time.perf_counter()
        maps, final = apps.map_reduce_summary(parts)
        print(
            f"\n=== Map-reduce summary of {title!r}: {len(parts)} chunks x {args.words} words ==="
        )
        print(await final.get(perf=pa.LATENCY))
        for i, m in enumerate(maps):
            print(f"  map {i}: {m.value().strip()[:160]}")
        finish(dc.MAP_REDUCE, before, t0)

        if not isinstance(rt, pa.Runtime):  # a service shows a session its own counters only
            session = await rt.stats()  # a coroutine on a remote runtime
            print(
                f"\nsession stats: calls={session.calls_completed} "
                f"prompt={session.prompt_tokens} generated={session.generated_tokens}"
            )
            print(
                "(no request-level comparison through --url: it runs on the engines of an "
                "embedded runtime; `parrot-actors bench` compares against a service)"
            )
            return
        engines = rt.stats().engines  # Parrot's runs only: taken before the baseline's
        baseline = await dc.request_level(rt.engines, parts)
        # Counted now: a call's record is kept when its task ends, just after its outputs
        # resolve; the baseline's calls are its own runtime's, never in this list.
        calls = {name: 0 for name in engines}
        for call in rt.call_stats():
            calls[call.engine] = calls.get(call.engine, 0) + 1
        print()
        rows = [(app, parrot[app], baseline[app]) for app in (dc.SNAKE, dc.MAP_REDUCE)]
        for line in dc.comparison_lines(rows):
            print(line)
        print("\nEngines after the Parrot runs (the request-level runs not counted):")
        for name, e in engines.items():
            print(f"  {dc.engine_summary(e, calls[name])}")


def load_main(path: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The async `main` of the app file at `path`. Raises `SystemExit` with a message when the
    file is missing or has no `async def main`."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"parrot-actors run: no such file: {path}")
    spec = importlib.util.spec_from_file_location("__parrot_app__", file)
    if spec is None or spec.loader is None:  # a file Python cannot import (e.g. no .py)
        raise SystemExit(f"parrot-actors run: not a Python file: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["__parrot_app__"] = module  # dataclasses and pickling look modules up here
    spec.loader.exec_module(module)
    main: object = getattr(module, "main", None)
    if inspect.iscoroutinefunction(main):
        return main
    raise SystemExit(f"parrot-actors run: {path} has no `async def main()`")


async def run_app(args: argparse.Namespace) -> None:
    """Run the app's `main()` (or `main(rt)` if it takes one argument) inside the runtime."""
    main = load_main(args.app)
    sys.argv = [args.app, *args.app_args]
    async with open_runtime(args) as rt:
        takes_runtime = len(inspect.signature(main).parameters) >= 1
        await (main(rt) if takes_runtime else main())


def serve(args: argparse.Namespace) -> None:
    """Run the service until SIGINT/SIGTERM."""
    from parrot_actors.scheduler.config import SchedulerConfig
    from parrot_actors.server import ServerConfig, run
    from parrot_actors.server.client import API_KEY_ENV

    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        session_ttl_s=args.session_ttl,
        max_pending_calls=args.max_pending_calls,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        metrics_key=args.metrics_key or os.environ.get(METRICS_KEY_ENV) or None,
    )
    scheduler = SchedulerConfig(policy=args.policy, prefix_sharing=not args.no_prefix_sharing)
    if args.ray:
        from parrot_actors.ray.serve import run_ray

        run_ray(args.ray, engine_specs(args), config, scheduler)
        return
    run(engine_specs(args), config, scheduler)


def _engine_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engines (serve, and demo/run without --url)")
    g.add_argument(
        "--model",
        default="default",
        help="'default' (the embedded SmolLM2-135M-Instruct), a local Hugging Face folder of a "
        "Llama-family model, or 'echo' (a fake engine, no model: for tries and tests)",
    )
    g.add_argument("--engines", type=int, default=1, help="engines of that model (default 1)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument(
        "--dtype",
        default="float32",
        help="float32, bfloat16, float16, or int8 (CPU: weight-only int8 matmul weights)",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the engine's CPU kernels (packed matmuls, fused ops, paged decode attention; "
        "built once, ~25 s): default on for CPU float32 models of hidden size >= 256; "
        "--compile requires them, --no-compile runs torch ops only",
    )
    g.add_argument("--kv-cache-mb", type=float, help="KV cache per engine, MiB (default 1024)")
    g.add_argument(
        "--random-model",
        metavar="JSON",
        help="random weights with these LlamaConfig fields instead of --model (benchmarks)",
    )
    g.add_argument(
        "--sim",
        metavar="GPU",
        help="simulated engines instead of a model: the real engine core on GPU's step-time "
        "model (a100-80gb, a6000, h100, cpu-fitted), each step lasting its predicted time",
    )
    g.add_argument(
        "--sim-model",
        default="llama-2-7b",
        help="the simulated model: llama-2-7b, vicuna-13b, llama-3-8b, ... or a config.json",
    )
    g.add_argument("--sim-kv-gb", type=float, help="simulated KV cache per engine (GB)")
    g.add_argument("--sim-tp", type=int, default=1, help="simulated GPUs per engine")
    g.add_argument("--sim-fit", help="step-time fit JSON (for --sim cpu-fitted)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `parrot-actors` (subcommands serve, demo, run)."""
    parser = argparse.ArgumentParser(
        prog="parrot-actors",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{serve,demo,run,bench,chaos}"
    )
    sub.add_parser(
        "bench",
        add_help=False,
        help="replay a paper workload in Parrot and baseline mode and report the speedup "
        "(`parrot-actors bench --help` for scenarios and flags)",
    )
    sub.add_parser(
        "chaos",
        add_help=False,
        help="mixed traffic with random aborts, bad inputs and session deletions against a "
        "running service, then a table of outcomes (`parrot-actors chaos --help`)",
    )
    engines = _engine_options()
    s = sub.add_parser(
        "serve",
        parents=[engines],
        help="run the HTTP service: the Parrot API (sessions, semantic calls, variables) and "
        "the OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions)",
        description="Run the service until Ctrl-C. Prints 'parrot-actors serving on URL' once "
        "it listens. Health at /health, Prometheus metrics at /metrics.",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=9000, help="port (default 9000; 0 = any free)")
    s.add_argument("--policy", default="app", choices=["app", "fcfs"], help="scheduling policy")
    s.add_argument(
        "--no-prefix-sharing", action="store_true", help="do not fork shared prefixes (baseline)"
    )
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit")
    s.add_argument("--session-ttl", type=float, default=600.0, help="idle session timeout, s")
    s.add_argument("--max-pending-calls", type=int, default=1024, help="per session (429 beyond)")
    s.add_argument(
        "--api-key",
        help="require this key on every /v1/* route, OpenAI ones included ('Authorization: "
        "Bearer KEY' or 'X-Api-Key: KEY'; default: $PARROT_ACTORS_API_KEY, else no key)",
    )
    s.add_argument(
        "--metrics-key",
        help="require this key on /health and /metrics (default: $PARROT_ACTORS_METRICS_KEY, "
        "else open: aggregate counters reveal traffic, so multi-tenant deployments set it)",
    )
    s.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the engines as Ray actors on the cluster at ADDRESS ('auto' or HOST:PORT): "
        "those of a running deployment with the same names (engine0, ...), else new ones that "
        "live as long as the server (needs the [ray] extra)",
    )

    d = sub.add_parser(
        "demo",
        parents=[engines],
        help="run the main job (WriteSnakeGame and a map-reduce summary), embedded on the "
        "default model, or against a running service with --url",
    )
    d.add_argument("--url", help="a running service, e.g. http://127.0.0.1:9000")
    d.add_argument("--api-key", help="the service's API key (default: $PARROT_ACTORS_API_KEY)")
    d.add_argument(
        "--document",
        help="text file to summarize (default: a chapter of the "
        "Python reference that ships with Python)",
    )
    d.add_argument("--chunks", type=int, default=4, help="map calls (default 4)")
    d.add_argument("--words", type=int, default=120, help="words per chunk (default 120)")

    r = sub.add_parser(
        "run",
        parents=[engines],
        help="run the `async def main()` of APP.py inside a runtime: embedded, or against a "
        "running service with --url (main may take the runtime as its one argument)",
        description="Run APP.py's `async def main()` (or `main(rt)`) inside a runtime. "
        "Arguments after `--` go to the app as sys.argv[1:].",
    )
    r.add_argument("app", metavar="APP.py", help="a Python file defining `async def main()`")
    r.add_argument("--url", help="a running service, e.g. http://127.0.0.1:9000")
    r.add_argument("--api-key", help="the service's API key (default: $PARROT_ACTORS_API_KEY)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `parrot-actors`; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the scenarios' own parser owns every flag after it
        from scenarios.cli import main as scenarios_main

        code: int = scenarios_main(argv, prog="parrot-actors")  # scenarios are not type-checked
        return code
    if argv and argv[0] == "chaos":
        from parrot_actors.chaos import main as chaos_main

        return chaos_main(argv[1:])
    app_args: list[str] = []
    if "--" in argv:  # everything after `--` belongs to the app of `run`
        cut = argv.index("--")
        argv, app_args = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    args.app_args = app_args
    if args.command == "serve":
        serve(args)
    elif args.command == "demo":
        asyncio.run(demo(args))
    elif args.command == "run":
        asyncio.run(run_app(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
