"""A server no client can break, over real HTTP: abort storms, session deletions, an engine
fault and its restart, API keys, and a 1,000-app soak (all loopback, bounded in time)."""

from __future__ import annotations

import asyncio
import itertools
import threading

import aiohttp
import openai
import pytest
import torch

import parrot_actors as pa
from parrot_actors.chaos import Chaos, ServiceState
from parrot_actors.engines import EngineConfig
from parrot_actors.engines.echo import EchoEngine
from parrot_actors.errors import ParrotError
from parrot_actors.server import BackgroundServer, ServerConfig
from tests.conftest import tiny_config

CONFIG = ServerConfig(port=0, reap_interval_s=0.2)


async def health(http: aiohttp.ClientSession, url: str, **kw) -> tuple[int, dict]:
    async with http.get(url + "/health", **kw) as r:
        return r.status, await r.json()


async def storm(chaos: Chaos, url: str, bursts: int = 3, size: int = 20) -> list[str]:
    """`bursts` bursts of `size` streams closed at random points (OpenAI and Parrot API) and
    sessions deleted while their calls run; a neighbour's greedy completion runs during each
    burst. Returns the neighbour's outputs."""
    kinds = itertools.cycle(["openai-abort", "parrot-abort", "openai-abort", "delete"])
    seen = []
    for _ in range(bursts):
        apps = [chaos._one(next(kinds)) for _ in range(size)]
        neighbour = chaos.completion(0, None, stream=False)
        *outcomes, text = await asyncio.gather(*apps, neighbour)
        assert {o for o, _ in outcomes} == {"aborted"}, outcomes
        seen.append(text)
    return seen


async def test_abort_storm_leaves_the_server_serving_everyone_exactly():
    with BackgroundServer([tiny_config(kv_cache_bytes=64 << 20)], CONFIG) as server:
        chaos = Chaos(server.url, model="random", max_tokens=24, op_timeout_s=60, seed=11)
        async with aiohttp.ClientSession() as http:
            chaos.http = http
            before = await chaos.completion(0, None, stream=False)
            # An answer is sent before its context's free is applied (between steps): read
            # the idle state once that has happened.
            idle = await chaos.settle(ServiceState(), 5.0)
            during = await storm(chaos, server.url)
            after_state = await chaos.settle(idle, 20.0)
            after = await chaos.completion(0, None, stream=False)
            status, body = await health(http, server.url)
    assert during == [before] * 3 and after == before  # token for token, under fire and after
    assert (after_state.kv_blocks_used, after_state.sessions) == (idle.kv_blocks_used, 0)
    assert (status, body["status"], after_state.restarts) == (200, "ok", 0)


@pytest.mark.real_model
async def test_abort_storm_on_the_real_model():
    with BackgroundServer([EngineConfig(kv_cache_bytes=256 << 20)], CONFIG) as server:
        chaos = Chaos(server.url, model="default", max_tokens=12, op_timeout_s=120, seed=5)
        async with aiohttp.ClientSession() as http:
            chaos.http = http
            before = await chaos.completion(3, None, stream=False)
            _, a_ref, s_ref = await chaos.parrot_app(4)
            idle = await chaos.settle(ServiceState(), 5.0)
            kinds = ["openai-abort", "parrot-abort", "delete", "openai-abort"] * 2
            outcomes = await asyncio.gather(*(chaos._one(k) for k in kinds))
            assert {o for o, _ in outcomes} == {"aborted"}, outcomes
            after_state = await chaos.settle(idle, 60.0)
            after = await chaos.completion(3, None, stream=False)
            _, a, s = await chaos.parrot_app(4)
            status, _ = await health(http, server.url)
    assert (after, a, s) == (before, a_ref, s_ref)
    assert (after_state.kv_blocks_used, after_state.sessions) == (idle.kv_blocks_used, 0)
    assert status == 200


async def test_an_engine_fault_is_logged_shown_and_healed_and_calls_are_retried(caplog):
    engine = tiny_config(restart_backoff_s=1.5, kv_cache_bytes=32 << 20)
    with BackgroundServer([engine], CONFIG) as server:
        chaos = Chaos(server.url, model="random", max_tokens=12, seed=3)
        async with aiohttp.ClientSession() as http:
            chaos.http = http
            ref_text = await chaos.completion(1, None, stream=False)
            _, a_ref, s_ref = await chaos.parrot_app(2)
            runner = server.runtime.engines[0].core.runner
            inner, fired = runner.forward, threading.Event()

            def faulty(*args: object, **kwargs: object) -> torch.Tensor:
                if not fired.is_set():
                    fired.set()
                    raise RuntimeError("injected fault in the forward pass")
                return inner(*args, **kwargs)

            runner.forward = faulty
            app = asyncio.ensure_future(chaos.parrot_app(2))
            completion = asyncio.ensure_future(chaos.completion(1, None, stream=False))
            assert await asyncio.to_thread(fired.wait, 10)
            status, body = await health(http, server.url)
            assert status == 503 and body["status"] == "down"
            assert "injected fault" in body["unhealthy"]["engine0"]
            (_, a, s), text = await asyncio.wait_for(asyncio.gather(app, completion), 10)
            assert (a, s, text) == (a_ref, s_ref, ref_text)  # retried to the same outputs
            status, body = await health(http, server.url)
            state = await chaos.state()
    assert (status, body["unhealthy"], state.restarts, state.engines_down) == (200, {}, 1, 0)
    logged = [r for r in caplog.records if r.name == "parrot_actors.engine"]
    assert logged and "injected fault" in (logged[0].exc_text or str(logged[0].exc_info))


async def test_api_and_metrics_keys():
    key, mkey = "k-0123456789", "m-0123456789"
    config = ServerConfig(port=0, api_key=key, metrics_key=mkey)
    with BackgroundServer([EchoEngine()], config) as server:
        url = server.url
        async with aiohttp.ClientSession() as http:

            async def status(method: str, path: str, **headers: str) -> int:
                async with http.request(method, url + path, headers=headers) as r:
                    return r.status

            assert await status("GET", "/v1/models") == 401
            assert await status("GET", "/v1/models", Authorization="Bearer wrong-key!") == 401
            assert await status("GET", "/v1/models", Authorization=f"Bearer {key}") == 200
            assert await status("GET", "/v1/models", **{"X-Api-Key": key}) == 200
            assert await status("POST", "/v1/sessions") == 401
            assert await status("GET", "/health") == 401
            assert await status("GET", "/metrics", Authorization=f"Bearer {key}") == 401
            assert await status("GET", "/metrics", Authorization=f"Bearer {mkey}") == 200
            assert await status("GET", "/health", **{"X-Api-Key": mkey}) == 200
            async with http.get(url + "/v1/models") as r:
                body = await r.json()
            assert body["error"]["type"] == "authentication_error"  # OpenAI's shape there
            assert body["error"]["code"] == "ApiKeyError" and key not in str(body)
            async with http.post(url + "/v1/sessions", headers={"X-Api-Key": key}) as r:
                token = (await r.json())["token"]
            # A session route: the session token in Authorization, the key in X-Api-Key.
            bearer = f"Bearer {token}"
            assert await status("GET", "/v1/stats", Authorization=bearer) == 401
            both = {"Authorization": bearer, "X-Api-Key": key}
            assert await status("GET", "/v1/stats", **both) == 200

        def openai_calls() -> str:
            good = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            text = good.completions.create(model="echo", prompt="hi", max_tokens=20).choices[0]
            bad = openai.OpenAI(base_url=url + "/v1", api_key="not-the-key", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model="echo", prompt="hi", max_tokens=20)
            return text.text

        assert await asyncio.to_thread(openai_calls) == "echo(hi)"

        @pa.semantic_function(max_tokens=32)
        def step(x: pa.Input, y: pa.Output):
            """Go {{x}} {{y}}"""

        async with pa.Runtime.connect(url, api_key=key):
            assert await step(pa.Variable("far")) == "echo(Go far )"
        with pytest.raises(ParrotError, match="needs the service's API key"):
            async with pa.Runtime.connect(url):
                pass


async def test_soak_of_a_thousand_apps_with_random_aborts():
    with BackgroundServer([tiny_config(kv_cache_bytes=64 << 20)], CONFIG) as server:
        chaos = Chaos(server.url, model="random", max_tokens=8, op_timeout_s=60, seed=1)
        # The first pass warms up the allocator; the second is the measured one.
        await chaos.run(apps=200, concurrency=32, settle_s=20, progress=False)
        report = await chaos.run(apps=1000, concurrency=32, settle_s=20, progress=False)
    print(report.table())
    assert report.count() == 1000
    assert report.errors == 0, report.examples  # nothing lost, wrong or failed
    assert report.count("ok") > 300 and report.count("aborted") > 300
    assert report.count("rejected") == report.count(kind="bad")
    before, after = report.before, report.after
    assert (after.kv_blocks_used, after.sessions) == (before.kv_blocks_used, 0)
    assert (after.restarts, after.engines_down) == (0, 0)
    assert 0 < before.rss_bytes and after.rss_bytes - before.rss_bytes < 50 * 2**20
