"""Ray: a local head started for this module; apps through `pa.Runtime.ray`, an app submitted
with `ray job submit`, engine actors killed mid-map-stage (retried, or failed with EngineError),
and outputs token-for-token equal to the embedded runtime's.

The head is `ray start --head --block --num-cpus 2 --dashboard-host 127.0.0.1
--disable-usage-stats` on free ports with its own temp dir, RAY_AUTH_MODE=disabled and
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (for the head, this process and the job CLI); the fixture
always stops it in teardown, even when a test fails. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray reads these when it is imported: set before, so this process stays on 127.0.0.1 too.
os.environ.update(RAY_ENV)
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'parrot_actors[ray]')")

import parrot_actors as pa  # noqa: E402
from parrot_actors import apps  # noqa: E402
from parrot_actors.messages import SamplingParams  # noqa: E402
from parrot_actors.ray import SERVICE_NAME, cluster, shutdown_deployment  # noqa: E402
from parrot_actors.ray.cluster import NAMESPACE, engine_actor_name  # noqa: E402
from parrot_actors.ray.serve import RaySharedRuntime  # noqa: E402
from parrot_actors.server import ServerConfig, start_server  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NORETRY = "parrot_actors.scheduler.noretry"
ENGINES = ("engine0", "engine1")


@pa.semantic_function(max_tokens=160, ignore_eos=True)
def summarize(chunk: pa.Input, summary: pa.Output):
    """You are a careful summarizer of technical notes. Keep every number and every name that
    the text mentions. Text: {{chunk}}
    Summary: {{summary}}"""


@pa.semantic_function(max_tokens=160, ignore_eos=True)
def digest(chunk: pa.Input, summary: pa.Output):
    """Another app with its own system prompt: digest the notes below for a weekly report,
    listing each item once. Notes: {{chunk}}
    Digest: {{summary}}"""


@pa.semantic_function(max_tokens=16, ignore_eos=True)
def combine(a: pa.Input, b: pa.Input, c: pa.Input, final: pa.Output):
    """Combine: {{a}} | {{b}} | {{c}} => {{final}}"""


@pa.semantic_function(max_tokens=24, temperature=1.0, seed=11)
def sampled(x: pa.Input, y: pa.Output):
    """Continue the story about {{x}}: {{y}}"""


PROMPT = "The three primary colors are"
CHUNKS_A = ["alpha 1 2 3", "beta 4 5 6", "gamma 7 8 9"]
CHUNKS_B = ["delta 10", "epsilon 11", "zeta 12"]
CHUNKS_C = ["eta 13", "theta 14"]


def map_app(chunks: list[str], fn=summarize) -> tuple[list[pa.Variable], pa.Variable]:
    """A map stage (one task group) of `fn` and a reduce over it."""
    maps = [fn(pa.Variable(c)) for c in chunks]
    return maps, combine(*maps)


def configs() -> list[pa.EngineConfig]:
    return [tiny_config(name=name) for name in ENGINES]


# ---- the cluster ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if head.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {head.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s} s")
        time.sleep(0.5)


def stop_head(head: subprocess.Popen) -> None:
    """Stop exactly this head: SIGTERM to its `ray start --block` stops every process it
    started (a plain `ray stop` would also stop other heads on a shared machine); its whole
    process group is killed if that takes over a minute."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)


@pytest.fixture(scope="module")
def head():
    """A local Ray head (2 CPUs, loopback only, free ports, its own temp dir); yields (GCS
    address, dashboard URL, env for the Ray CLI)."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip(f"the ray CLI is not in {BIN}")
    # The job's `python` must be this interpreter: the head's PATH starts with its folder.
    env = {**os.environ, **RAY_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM stops at once, no drain wait
    constants = ray._private.ray_constants
    loopback = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before RAY_ENV was set
    temp = tempfile.mkdtemp(prefix="rpa_", dir="/tmp")  # short: Unix socket paths are limited
    port, dash = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2"]
    cmd += ["--dashboard-host", "127.0.0.1", "--disable-usage-stats", "--temp-dir", temp]
    cmd += ["--port", str(port), "--dashboard-port", str(dash)]
    cmd += ["--dashboard-agent-listen-port", str(free_port())]
    cmd += ["--ray-client-server-port", str(free_port())]
    cmd += ["--object-store-memory", str(100_000_000)]
    log = open(Path(temp) / "ray_start.log", "w")  # closed in the finally below
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    connected = False
    try:
        dashboard = f"http://127.0.0.1:{dash}"
        wait_http(f"{dashboard}/api/version", 120, proc)
        cluster.acquire(f"127.0.0.1:{port}")
        connected = True
        yield f"127.0.0.1:{port}", dashboard, env
    finally:
        try:
            if connected:
                cluster.release()
        finally:
            stop_head(proc)
            log.close()
            shutil.rmtree(temp, ignore_errors=True)
            constants.ENABLE_RAY_CLUSTER = loopback


@pytest.fixture(scope="module")
async def expected():
    """The embedded runtime's outputs for every app below (same tiny engines, greedy)."""
    out = {}
    async with pa.Runtime(engines=configs()) as rt:
        code, test = apps.snake_game()
        out["snake"] = [await code, await test]
        for key, chunks, fn in (("A", CHUNKS_A, summarize), ("B", CHUNKS_B, digest)):
            maps, final = map_app(chunks, fn)
            out[key] = [await final] + [m.value() for m in maps]
        out["C"] = await pa.gather(*[summarize(pa.Variable(c)) for c in CHUNKS_C])
        out["sampled"] = await sampled(pa.Variable("a fox"))
        assert rt.stats().calls_failed == 0
        engine = rt.engines[0]
        await engine.fill("by-hand", text=PROMPT)
        out["completion"] = (await engine.generate("by-hand", SamplingParams(max_tokens=12))).text
    return out


# ---- helpers --------------------------------------------------------------------------------


async def until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def engine_of(rt, maps: list[pa.Variable]) -> str:
    """The one engine the map stage was dispatched to."""
    ids = {m.producer.id for m in maps}

    async def placed():
        engines = {d for ev, cid, d in await rt.call_log() if ev == "dispatch" and cid in ids}
        return engines if len(engines) >= 1 else None

    engines = await until(placed, 60, "the map stage was not dispatched")
    assert len(engines) == 1, engines  # a task group runs on one engine
    return engines.pop()


async def kill_while_generating(engine: str) -> None:
    """`ray.kill` the engine's actor (Ray restarts it) once it is generating."""
    handle = ray.get_actor(engine_actor_name(engine), namespace=NAMESPACE)
    start = (await handle.stats.remote()).stats.generated_tokens

    async def generating():
        stats = (await handle.stats.remote()).stats
        return stats.running > 0 and stats.generated_tokens > start + 8

    await until(generating, 60, f"{engine} did not start generating", interval_s=0.02)
    ray.kill(handle, no_restart=False)


def events_of(log: list, maps: list[pa.Variable]) -> dict[int, list[tuple[str, str]]]:
    ids = [m.producer.id for m in maps]
    return {
        i: [(ev, d) for ev, cid, d in log if cid == i and ev in ("dispatch", "retry")] for i in ids
    }


async def outcome(maps: list[pa.Variable], final: pa.Variable, gate=None) -> list:
    """[final, *maps] as values, or the exception each raised. With `gate`, the map stage
    runs first and the reduce is asked for only once the gate opens."""
    if gate is not None:
        await asyncio.gather(*[m.get(perf=pa.THROUGHPUT) for m in maps])
        await gate.wait()
    results = await asyncio.gather(final.get(), *[m.get() for m in maps], return_exceptions=True)
    return list(results)


async def two_apps_with_a_kill(address: str, service: str) -> tuple[dict, dict]:
    """Apps A and B in two sessions, their map stages on different engines; A's engine is
    killed mid-generation. B asks for its reduce once the service saw the death (a call placed
    on an engine in the second or so before Ray reports its death counts as in flight there).
    Returns per app: outcome, dispatch/retry events per map call, engine."""
    out: dict[str, dict] = {}
    gate = asyncio.Event()
    async with pa.Runtime.ray(address, service=service) as rt_a:
        maps_a, final_a = map_app(CHUNKS_A)
        task_a = asyncio.ensure_future(outcome(maps_a, final_a))
        engine_a = await engine_of(rt_a, maps_a)
        async with pa.Runtime.ray(address, service=service) as rt_b:
            maps_b, final_b = map_app(CHUNKS_B, digest)  # no prefix shared with A
            task_b = asyncio.ensure_future(outcome(maps_b, final_b, gate))
            engine_b = await engine_of(rt_b, maps_b)
            await kill_while_generating(engine_a)

            async def noticed():
                return not (await rt_b.health())[engine_a]

            await until(noticed, 60, f"the service did not notice {engine_a} died")
            gate.set()
            res_b = await asyncio.wait_for(task_b, 120)
            out["B"] = {"res": res_b, "ev": events_of(await rt_b.call_log(), maps_b)}
            out["B"]["engine"] = engine_b
        res_a = await asyncio.wait_for(task_a, 120)
        out["A"] = {"res": res_a, "ev": events_of(await rt_a.call_log(), maps_a)}
        out["A"]["engine"] = engine_a
    return out["A"], out["B"]


def assert_untouched(app: dict, expected: list) -> None:
    """Every map call dispatched once to the app's engine, never retried; exact outputs."""
    assert app["res"] == expected
    assert all(ev == [("dispatch", app["engine"])] for ev in app["ev"].values()), app["ev"]


async def all_healthy(rt) -> bool:
    return all((await rt.health()).values())


# ---- the tests ------------------------------------------------------------------------------


async def test_apps_on_ray_equal_the_embedded_runtime(head, expected):
    address, _, _ = head
    async with pa.Runtime.ray(address, engines=configs()) as rt:
        code, test = apps.snake_game()
        assert [await code.get(perf=pa.LATENCY), await test] == expected["snake"]
        maps, final = map_app(CHUNKS_A)
        assert [await final] + [m.value() for m in maps] == expected["A"]  # upstream came too
        assert await sampled(pa.Variable("a fox")) == expected["sampled"]
        stats = await rt.stats()  # the session's own counters
        assert (stats.calls_completed, stats.calls_failed) == (7, 0)
        assert stats.generated_tokens >= 3 * 160 + 16  # at least the ignore_eos calls
        assert await rt.health() == dict.fromkeys(ENGINES, True)
        log = await rt.call_log()
        assert {d for ev, _, d in log if ev == "dispatch"} <= set(ENGINES)
        assert [ev for ev, cid, _ in log if cid == code.producer.id][:2] == ["ready", "dispatch"]


async def completion(http, url: str, stream: bool) -> str:
    body = {"model": "random", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    async with http.post(f"{url}/v1/completions", json={**body, "stream": stream}) as resp:
        assert resp.status == 200, await resp.text()
        if not stream:
            return (await resp.json())["choices"][0]["text"]
        lines = (await resp.text()).splitlines()
    events = [x[len("data: ") :] for x in lines if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(c["text"] for e in events[:-1] for c in json.loads(e).get("choices", []))


async def test_http_service_in_front_of_the_ray_engines(head, expected):
    """What `parrot-actors serve --ray` runs: the scheduler in the server process over the
    deployment's engine actors (attached by name)."""
    import aiohttp

    address, _, _ = head
    runtime = RaySharedRuntime(address, configs())
    await runtime.start()
    try:
        assert [type(p).__name__ for p in runtime.proxies] == ["RayEngine", "RayEngine"]
        server = await start_server(config=ServerConfig(port=0), runtime=runtime)
        try:
            async with pa.Runtime.connect(server.url) as rt:
                code, test = apps.snake_game()
                assert [await code, await test] == expected["snake"]
                stats = await rt.stats()  # the session's own view
                assert (stats.calls_completed, stats.calls_failed) == (2, 0)
            async with aiohttp.ClientSession() as http:
                assert await completion(http, server.url, stream=False) == expected["completion"]
                assert await completion(http, server.url, stream=True) == expected["completion"]
        finally:
            await server.close()
    finally:
        await runtime.close()


def test_ray_job_submit_runs_the_example(head, expected):
    _, dashboard, env = head
    cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", "."]
    cmd += ["--", "python", "examples/ray_app.py", "--tiny"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-4000:]
    assert "succeeded" in logs
    line = next(x for x in logs.splitlines() if x.startswith("RESULT "))
    assert json.loads(line[len("RESULT ") :]) == {
        "code": expected["snake"][0],
        "test": expected["snake"][1],
    }


async def test_killed_engine_calls_are_retried_and_it_rejoins(head, expected):
    address, _, _ = head
    app_a, app_b = await two_apps_with_a_kill(address, SERVICE_NAME)
    assert app_a["engine"] != app_b["engine"]
    assert_untouched(app_b, expected["B"])  # the other engine's app never noticed
    assert app_a["res"] == expected["A"]  # recomputed on the surviving engine
    for ev in app_a["ev"].values():
        assert ev == [("dispatch", app_a["engine"]), ("retry", app_a["engine"])] + [
            ("dispatch", app_b["engine"])
        ]
    async with pa.Runtime.ray(address) as rt:
        await until(lambda: all_healthy(rt), 120, "the killed engine did not rejoin", 0.2)
        outs = [summarize(pa.Variable(c)) for c in CHUNKS_C]
        assert await pa.gather(*outs) == expected["C"]
        log = await rt.call_log()
        assert {d for ev, _, d in log if ev == "dispatch"} == set(ENGINES)  # it takes work again
        status = {s.name: s for s in await rt.engine_status()}
        assert (status[app_a["engine"]].restarts, status[app_b["engine"]].restarts) == (1, 0)
        # A's system-prompt prefix died with the actor; the call placed there refilled it.
        assert status[app_a["engine"]].replays == 1


async def test_killed_engine_fails_calls_with_engine_error_without_retries(head, expected):
    address, _, _ = head
    noretry = pa.SchedulerConfig(max_retries=0)
    async with pa.Runtime.ray(address, engines=configs(), scheduler=noretry, service=NORETRY) as rt:
        await until(lambda: all_healthy(rt), 120, "the engines were not healthy", 0.2)
    try:
        app_a, app_b = await two_apps_with_a_kill(address, NORETRY)
    finally:
        await shutdown_deployment(NORETRY, engines=False)
    assert app_a["engine"] != app_b["engine"]
    assert_untouched(app_b, expected["B"])
    assert all(isinstance(r, pa.CallError) for r in app_a["res"]), app_a["res"]
    for err in app_a["res"][1:]:  # each map call: its engine died under it
        assert isinstance(err.__cause__, pa.EngineError)
        assert type(err.__cause__).__name__ == "EngineDiedError"
    chain, err = [], app_a["res"][0]  # the reduce: its inputs failed, because the engine died
    while err is not None:
        chain.append(type(err).__name__)
        err = err.__cause__
    assert chain[:3] == ["CallError", "CallError", "EngineDiedError"], chain
    assert all(ev == [("dispatch", app_a["engine"])] for ev in app_a["ev"].values())
