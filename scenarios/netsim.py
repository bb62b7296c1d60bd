"""A simulated network between a benchmark's clients and its service: a loopback HTTP proxy
that delays every request by one round trip and counts them.

Scenarios whose clients are libraries that make their own HTTP requests (LangChain's
`ChatOpenAI`, `ChatParrot`, `compile_chain`, `pa.Runtime.connect`) cannot call
`RunContext.network()` per request; pointed at the proxy, every request any of them sends pays
the same `rtt_s` (Parrot §8: 250 ms) before it reaches the service, whatever the library, and
is counted by (method, path). Responses stream back unbuffered (SSE answers keep their timing).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
from aiohttp import web

from parrot_actors import clock

_HOP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "content-encoding",
    }
)
"""Headers that describe one hop (aiohttp sets its own on each side)."""


class DelayProxy:
    """Forwards every request to `target` (a base URL) after `rtt_s` seconds. `requests`
    counts the requests seen by (method, path with ids cut to their route: the text after
    /v1/variables/ becomes {id}); `delays` holds each request's (start, end) on the network
    (`clock.now()` seconds; one per request, a benchmark's few thousand at most). Use as
    `async with DelayProxy(url, 0.25) as proxy:` and send to `proxy.url`. A target that fails
    mid-request makes the proxy answer 500 (the client sees a failed request)."""

    def __init__(self, target: str, rtt_s: float) -> None:
        self.target = target.rstrip("/")
        self.rtt_s = rtt_s
        self.url = ""
        self.requests: Counter[tuple[str, str]] = Counter()
        self.delays: list[tuple[float, float]] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def count(self) -> int:
        """Requests forwarded so far."""
        return sum(self.requests.values())

    def since(self, first: int) -> dict[str, float]:
        """What requests number `first` onward cost: "requests" (count) and "network s" (the
        seconds in which at least one of them was on the simulated network: concurrent
        requests overlap, so this is the round trips on the app's path times `rtt_s`)."""
        spans = sorted(self.delays[first:])
        total, end = 0.0, float("-inf")
        for a, b in spans:
            if b > end:
                total += b - max(a, end)
                end = b
        return {"requests": float(len(spans)), "network s": total}

    async def __aenter__(self) -> DelayProxy:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
        )
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._http is not None
        self.requests[(request.method, _route(request.path))] += 1
        body = await request.read()
        start = clock.now()
        if self.rtt_s > 0:
            await asyncio.sleep(self.rtt_s)
        self.delays.append((start, clock.now()))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._http.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as up:
            out = web.StreamResponse(
                status=up.status,
                headers={k: v for k, v in up.headers.items() if k.lower() not in _HOP_HEADERS},
            )
            encoding = up.headers.get("Content-Encoding")
            if encoding:
                out.headers["Content-Encoding"] = encoding
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out


def _route(path: str) -> str:
    for prefix in ("/v1/variables/", "/v1/parrot/sessions/"):
        if path.startswith(prefix) and len(path) > len(prefix):
            rest = path[len(prefix) :].split("/", 1)
            return prefix + "{id}" + ("/" + rest[1] if len(rest) > 1 else "")
    return path
