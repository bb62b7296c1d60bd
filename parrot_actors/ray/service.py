"""The service of a Ray deployment: `ServiceActor`, a named, detached actor that serves the
HTTP API (the Parrot API and the OpenAI one) over the deployment's engine actors.

It runs the same `Runtime` (graph bookkeeping + `Scheduler`) and the same aiohttp app as
`parrot-actors serve`, over `RayEngine` proxies; clients (`pa.Runtime.ray`, a `RayRuntime`)
find it by name, ask it for its URL and API key, and then speak HTTP like `pa.Runtime.connect`.
So there is one remote stack: one client, one set of wire structs, one error codec, one
session implementation. Chosen by measurement (docs/guide.md, "Ray"): a loopback HTTP round
trip took 0.38 ms, a Ray async actor call 1.60 ms, on this project's machine.

The server listens on the actor's node IP with a random API key that only Ray clients can read
(anyone who can reach the cluster controls it anyway); pass a `ServerConfig` to choose others.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from typing import cast

import msgspec
import ray

from parrot_actors.engines.engine import EngineConfig
from parrot_actors.ray.proxy import RayEngine
from parrot_actors.ray.serve import RaySharedRuntime
from parrot_actors.ray.spawn import SpawnOptions
from parrot_actors.ray.wire import EngineStatus
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.server.app import Server, start_server
from parrot_actors.server.config import ServerConfig


class Endpoint(msgspec.Struct, frozen=True):
    """Where a deployment's HTTP service listens, and its API key."""

    url: str
    api_key: str


class ServiceActor:
    """The service actor body (see the module docstring).

    engines: `EngineConfig`s of the engine actors (spawned, or attached to by name).
    scheduler: `SchedulerConfig`. spawn: `SpawnOptions`. server: the HTTP server's config
    (default: the node's IP, a free port, a random API key).
    """

    def __init__(
        self,
        engines: Sequence[EngineConfig],
        scheduler: SchedulerConfig | None = None,
        spawn: SpawnOptions | None = None,
        server: ServerConfig | None = None,
    ) -> None:
        self.engine_configs = list(engines)
        self.scheduler_config = scheduler
        self.spawn = spawn
        if server is None:
            # Ray leaves `get_node_ip_address` unannotated: it returns this node's IP (a str).
            node_ip = cast(Callable[[], str], ray.util.get_node_ip_address)
            server = ServerConfig(host=node_ip(), port=0, api_key=secrets.token_urlsafe(24))
        self.server_config = server
        self.runtime: RaySharedRuntime | None = None
        self.server: Server | None = None
        self._starting: asyncio.Task[None] | None = None

    async def start(self) -> Endpoint:
        """Spawn or attach to the engines, start the scheduler and the HTTP server (once;
        later calls wait for the first). Raises the engines' build errors."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)
        return self.endpoint()

    async def _start(self) -> None:
        runtime = RaySharedRuntime("auto", self.engine_configs, self.scheduler_config, self.spawn)
        await runtime.start()
        try:
            self.server = await start_server(config=self.server_config, runtime=runtime)
        except BaseException:
            await runtime.close()
            raise
        self.runtime = runtime

    def endpoint(self) -> Endpoint:
        """The server's URL and API key. Raises `RuntimeError` before `start`."""
        if self.server is None:
            raise RuntimeError("the service is not started")
        return Endpoint(url=self.server.url, api_key=self.server_config.api_key or "")

    async def health(self) -> dict[str, bool]:
        """Engine name -> healthy (False while Ray restarts its actor or it rebuilds)."""
        return {p.name: p.stats().healthy for p in self._proxies()}

    async def engine_status(self) -> list[EngineStatus]:
        """Each engine's health, incarnation and fault counters, in order."""
        return [p.status() for p in self._proxies()]

    async def engine_names(self) -> list[str]:
        """The engines' names, in order."""
        await self.start()
        return [p.name for p in self._proxies()]

    async def shutdown(self) -> list[str]:
        """Stop the HTTP server (sessions end, their calls are cancelled) and the scheduler;
        returns the engine names (engine actors this service created end with it)."""
        names = [p.name for p in self._proxies()]
        if self.server is not None:
            await self.server.close()  # owns nothing: the runtime is closed below
        if self.runtime is not None:
            await self.runtime.close()
        return names

    def _proxies(self) -> list[RayEngine]:
        return list(self.runtime.proxies) if self.runtime is not None else []
