"""Running the service on its own event loop in a background thread (tests, notebooks).

The server's loop is independent of the caller's, so blocking clients (http.client, the
`openai` client) and async ones in another loop can both talk to it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from parrot_actors.engines.api import EngineClient
from parrot_actors.engines.engine import EngineConfig
from parrot_actors.runtime import Runtime
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.server.app import Server, start_server
from parrot_actors.server.config import ServerConfig

T = TypeVar("T")


class BackgroundServer:
    """`with BackgroundServer(engines, config) as server:` serves on 127.0.0.1 (a free port
    unless `config.port` says otherwise) until the block ends.

    engines: EngineConfigs or engine objects, started on the server's loop. `url`: the base URL.
    `call(fn)`: run `fn()` (a coroutine function) on the server's loop and return its result,
    e.g. to read engine stats. Raises what starting the server raises, and `TimeoutError` if it
    does not start within `start_timeout_s` seconds.
    """

    def __init__(
        self,
        engines: Sequence[EngineConfig | EngineClient],
        config: ServerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.engines = list(engines)
        self.config = config or ServerConfig(port=0)
        self.scheduler = scheduler
        self.start_timeout_s = start_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:40123`."""
        assert self.server is not None, "the server is not started"
        return self.server.url

    @property
    def runtime(self) -> Runtime:
        """The shared runtime (touch it only through `call`)."""
        assert self.server is not None, "the server is not started"
        return self.server.runtime

    def start(self) -> BackgroundServer:
        """Start the loop thread and the server on it; returns self once listening."""
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="parrot-actors-server", daemon=True
        )
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            start_server(self.engines, self.config, self.scheduler), self.loop
        )
        try:
            self.server = fut.result(self.start_timeout_s)
        except BaseException:
            self._stop_loop()
            raise
        return self

    def call(self, fn: Callable[[], Awaitable[T]], timeout_s: float = 60.0) -> T:
        """Run `fn()` on the server's loop; its result (or exception)."""
        assert self.loop is not None, "the server is not started"
        return asyncio.run_coroutine_threadsafe(_invoke(fn), self.loop).result(timeout_s)

    def stop(self) -> None:
        """End every session, stop the server and its runtime, and the loop thread."""
        if self.server is not None and self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(60)
            self.server = None
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self.loop.close()
            self.loop = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _invoke(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()
