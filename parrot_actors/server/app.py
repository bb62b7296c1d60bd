"""The aiohttp application and the ways to run it.

`create_app(runtime, config)` builds the app over a started runtime (tests use it with
EchoEngine or tiny engines); `start_server(...)` listens on a real socket and returns a handle;
`run(...)` is the blocking entry point of `parrot-actors serve` (uvloop when installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import uuid
from collections.abc import Sequence

from aiohttp import web

from parrot_actors.engines.api import EngineClient
from parrot_actors.engines.engine import EngineConfig
from parrot_actors.runtime import Runtime
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.server.auth import auth_middleware
from parrot_actors.server.config import ServerConfig
from parrot_actors.server.http import error_middleware, json_response
from parrot_actors.server.metrics import Metrics
from parrot_actors.server.openai_api import OpenAIAPI
from parrot_actors.server.parrot_api import ParrotAPI
from parrot_actors.server.protocol import Health, Version
from parrot_actors.server.router import EngineRouter
from parrot_actors.server.sessions import SessionManager

log = logging.getLogger("parrot_actors.server")

SESSIONS = web.AppKey("sessions", SessionManager)
METRICS = web.AppKey("metrics", Metrics)
RUNTIME = web.AppKey("runtime", Runtime)


def create_app(runtime: Runtime, config: ServerConfig | None = None) -> web.Application:
    """The service over a started `runtime` (variables stream token by token through its
    `tap`). The app ends every session
    on cleanup; closing the runtime stays the caller's job. Raises `InvalidRequestError` for
    a bad config."""
    config = (config or ServerConfig()).validate()
    sessions = SessionManager(runtime, config)
    metrics = Metrics(runtime, lambda: len(sessions))
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[
            metrics.middleware(),
            error_middleware,
            auth_middleware(config.api_key, config.metrics_key),
        ],
    )
    app[SESSIONS] = sessions
    app[METRICS] = metrics
    app[RUNTIME] = runtime
    router = EngineRouter(runtime)
    parrot = ParrotAPI(runtime, sessions, config, metrics)
    openai = OpenAIAPI(runtime, router, config, metrics)

    async def health(request: web.Request) -> web.Response:
        stats = [e.stats() for e in router.engines]
        down = {s.name: s.last_error or "down" for s in stats if not s.healthy}
        status = "ok" if not down else "down" if len(down) == len(stats) else "degraded"
        body = Health(
            status=status,
            engines=len(stats),
            sessions=len(sessions),
            models=router.models(),
            unhealthy=down,
        )
        return json_response(body, status=200 if not down else 503)

    async def prometheus(request: web.Request) -> web.Response:
        body, ctype = metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def version(request: web.Request) -> web.Response:
        return json_response(Version(version=package_version()))

    app.add_routes([web.get("/health", health), web.get("/metrics", prometheus)])
    app.add_routes([web.get("/version", version)])
    app.add_routes(parrot.routes())
    app.add_routes(openai.routes())

    async def on_startup(_: web.Application) -> None:
        sessions.start_reaper()

    async def on_cleanup(_: web.Application) -> None:
        await sessions.close_all()

    app.on_response_prepare.append(_request_id)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def package_version() -> str:
    """This package's installed version (pyproject's), or "unknown" when it runs from a
    source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("parrot_actors")
    except PackageNotFoundError:
        return "unknown"


REQUEST_ID = "X-Request-Id"
"""The header every answer carries: the client's own (when it is 1-128 characters of letters,
digits and `._:-`), else a new random id, so a request can be found in logs."""
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


async def _request_id(request: web.Request, response: web.StreamResponse) -> None:
    given = request.headers.get(REQUEST_ID, "")
    response.headers[REQUEST_ID] = given if _REQUEST_ID_OK.match(given) else uuid.uuid4().hex


class Server:
    """A running service: `url`, and `close()` to stop listening, end the sessions and (when
    it started it) close the runtime."""

    def __init__(self, runner: web.AppRunner, url: str, runtime: Runtime, owns: bool) -> None:
        self.runner = runner
        self.url = url
        self.runtime = runtime
        self._owns = owns

    async def close(self) -> None:
        """Stop the server (open connections are cut), then the runtime if owned."""
        await self.runner.cleanup()
        if self._owns:
            await self.runtime.close()


LISTEN_BACKLOG = 4096
"""Pending connections the listening socket queues (the kernel caps it at net.core.somaxconn)."""


async def start_server(
    engines: Sequence[EngineConfig | EngineClient] | None = None,
    config: ServerConfig | None = None,
    scheduler: SchedulerConfig | None = None,
    runtime: Runtime | None = None,
) -> Server:
    """Start a `Runtime` over `engines` (EngineConfigs or engine objects; none: the
    default model), or use the started `runtime` given, and serve it on
    `config.host:config.port` (port 0: a free port). Client disconnects cancel their handlers
    (and so their generations). Raises `OSError` when the address is taken."""
    config = (config or ServerConfig()).validate()
    owns = runtime is None
    if runtime is None:
        runtime = Runtime(engines=list(engines or []) or None, scheduler=scheduler)
        await runtime.start()
    try:
        runner = web.AppRunner(create_app(runtime, config), handler_cancellation=True)
        await runner.setup()
        # A deep accept queue: hundreds of clients connecting at one instant (a load test, a
        # simulated run's sessions) overflowed aiohttp's default of 128, and the kernel's
        # dropped handshakes surfaced as connection errors (ReadError) in the clients.
        site = web.TCPSite(runner, config.host, config.port, backlog=LISTEN_BACKLOG)
        await site.start()
    except BaseException:
        if owns:
            await runtime.close()
        raise
    port = runner.addresses[0][1]
    return Server(runner, f"http://{config.host}:{port}", runtime, owns)


async def serve_forever(
    engines: Sequence[EngineConfig | EngineClient],
    config: ServerConfig,
    scheduler: SchedulerConfig | None = None,
    runtime: Runtime | None = None,
    label: str = "",
) -> None:
    """Serve until SIGINT/SIGTERM (over `runtime` when given, which stays the caller's to
    close); prints "parrot-actors serving on URL" and `label` once listening."""
    server = await start_server(engines, config, scheduler, runtime=runtime)
    print(f"parrot-actors serving on {server.url}{label}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


def run(
    engines: Sequence[EngineConfig | EngineClient],
    config: ServerConfig,
    scheduler: SchedulerConfig | None = None,
) -> None:
    """Blocking entry point: `serve_forever` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_forever(engines, config, scheduler))
        return
    uvloop.run(serve_forever(engines, config, scheduler))
