"""The paper's apps through `pa.Runtime.connect` give the embedded greedy text, token for
token, on a tiny random-weight model; a variable streams its tokens as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

import parrot_actors as pa
from parrot_actors import apps
from parrot_actors.server import BackgroundServer
from tests.conftest import tiny_config

KV = 32 << 20


@pytest.fixture(scope="module")
def server():
    with BackgroundServer([tiny_config(kv_cache_bytes=KV)]) as srv:
        yield srv


async def both_apps() -> list[str]:
    code, test = apps.snake_game()
    _, text = apps.demo_document()
    maps, final = apps.map_reduce_summary(apps.chunk_words(text, 3, 40))
    out = [await test.get(perf=pa.LATENCY), code.value(), await final.get(perf=pa.LATENCY)]
    return out + [m.value() for m in maps]


async def test_snake_game_and_map_reduce_match_embedded(server):
    async with pa.Runtime.connect(server.url) as rt:
        remote = await both_apps()
        remote_stats = await rt.stats()
    async with pa.Runtime(engines=[tiny_config(kv_cache_bytes=KV)]) as rt:
        embedded = await both_apps()
        embedded_stats = rt.stats()
    assert remote == embedded
    assert all(remote) and len(remote) == 6
    assert remote_stats.calls_completed == embedded_stats.calls_completed == 6
    assert remote_stats.generated_tokens == embedded_stats.generated_tokens


async def read_sse(resp: aiohttp.ClientResponse) -> list[tuple[str, dict]]:
    events, event = [], "message"
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            events.append((event, json.loads(line[6:])))
            event = "message"
    return events


POEM = {
    "template": "Write a short poem about {{input:topic}}.\nPoem: {{output:poem}}",
    "args": {"topic": {"value": "the sea"}, "poem": {"sampling": {"max_tokens": 12}}},
}


async def test_variable_streams_tokens_as_sse(server):
    async with aiohttp.ClientSession(server.url) as http:
        async with http.post("/v1/sessions") as r:
            auth = {"Authorization": f"Bearer {(await r.json())['token']}"}
        ids = []
        for _ in range(2):
            async with http.post("/v1/calls", json=POEM, headers=auth) as r:
                assert r.status == 201
                ids.append((await r.json())["outputs"]["poem"])
        async with http.get(f"/v1/variables/{ids[0]}/stream", headers=auth) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            events = await read_sse(r)
        async with http.get(f"/v1/variables/{ids[1]}", headers=auth) as r:
            whole = await r.json()
        await http.delete("/v1/session", headers=auth)
    tokens = [data["text"] for kind, data in events if kind == "token"]
    assert [kind for kind, _ in events][-1] == "done"
    done = events[-1][1]
    assert done["state"] == "done" and done["value"] == whole["value"]
    assert "".join(tokens) == whole["value"]
    assert len(tokens) >= 3  # token by token, not one chunk


async def test_closing_a_variable_stream_cancels_its_call_and_frees_kv(server):
    engine = server.runtime.engines[0]
    long_poem = {
        "template": "Write a long poem about {{input:topic}}.\nPoem: {{output:poem}}",
        "args": {
            "topic": {"value": "rivers"},
            "poem": {"sampling": {"max_tokens": 400, "ignore_eos": True}},
        },
    }
    base = engine.stats()
    async with aiohttp.ClientSession(server.url) as http:
        async with http.post("/v1/sessions") as r:
            auth = {"Authorization": f"Bearer {(await r.json())['token']}"}
        async with http.post("/v1/calls", json=long_poem, headers=auth) as r:
            poem = (await r.json())["outputs"]["poem"]
        async with http.get(f"/v1/variables/{poem}/stream", headers=auth) as r:
            seen = 0
            async for raw in r.content:
                seen += raw.startswith(b"event: token")
                if seen == 3:
                    break
            assert engine.stats().kv_blocks_used > base.kv_blocks_used
            r.connection.transport.abort()  # the client goes away mid-generation
        for _ in range(500):
            if engine.stats().kv_blocks_used == base.kv_blocks_used:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().kv_blocks_used == base.kv_blocks_used
        assert engine.stats().generated_tokens - base.generated_tokens < 400
        async with http.get(f"/v1/variables/{poem}?timeout=0", headers=auth) as r:
            state = await r.json()
        assert state["state"] == "failed" and "was cancelled" in state["error"]["message"]
        await http.delete("/v1/session", headers=auth)


async def test_deleting_a_session_frees_its_kv_blocks(server):
    engine = server.runtime.engines[0]
    base = engine.stats().kv_blocks_used
    async with aiohttp.ClientSession(server.url) as http:
        async with http.post("/v1/sessions") as r:
            auth = {"Authorization": f"Bearer {(await r.json())['token']}"}
        ids = []
        for topic in ("maps", "rain"):
            call = {
                "template": "Describe {{input:t}} at length.\nText: {{output:o}}",
                "args": {
                    "t": {"value": topic},
                    "o": {"sampling": {"max_tokens": 400, "ignore_eos": True}},
                },
            }
            async with http.post("/v1/calls", json=call, headers=auth) as r:
                ids.append((await r.json())["outputs"]["o"])
            async with http.get(f"/v1/variables/{ids[-1]}?timeout=0", headers=auth) as r:
                assert (await r.json())["state"] == "pending"
        for _ in range(500):
            if engine.stats().running == 2:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().kv_blocks_used > base
        async with http.delete("/v1/session", headers=auth) as r:
            assert (await r.json())["cancelled_calls"] == 2
        assert engine.stats().kv_blocks_used == base  # freed before DELETE answered
