"""`parrot-actors serve --ray ADDRESS`: the HTTP service in front of a Ray deployment.

The server process runs the scheduler (the unchanged `Runtime`, so token streaming and both
APIs work as embedded) over `RayEngine` proxies of engine actors on the cluster: the
actors of a running deployment when they exist (found by engine name), else new ones placed
by the spawner (tied to this process unless `SpawnOptions.detached`).

    from parrot_actors.ray.serve import run_ray
    run_ray("auto", [EngineConfig(name="engine0"), ...], ServerConfig(port=9000))
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from parrot_actors.engines.api import EngineClient
from parrot_actors.engines.engine import EngineConfig
from parrot_actors.errors import InvalidRequestError
from parrot_actors.ray import cluster
from parrot_actors.ray.proxy import RayEngine
from parrot_actors.ray.spawn import SpawnOptions, spawn_engines
from parrot_actors.runtime import Runtime, with_scheduler_caching
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.server.app import serve_forever
from parrot_actors.server.config import ServerConfig


class RaySharedRuntime(Runtime):
    """A `Runtime` whose engines are Ray engine actors (see the module docstring).

    address: the Ray cluster ("auto", "HOST:PORT"). engines: `EngineConfig`s (their names
    select existing actors). scheduler: `SchedulerConfig`. spawn: `SpawnOptions` for engines
    it creates (default: not detached, so they end with this process). Raises
    `InvalidRequestError` for engines that are not `EngineConfig`s (e.g. `--model echo`), and
    what `spawn_engines` and `RayEngine.connect` raise.
    """

    def __init__(
        self,
        address: str,
        engines: Sequence[EngineConfig | EngineClient],
        scheduler: SchedulerConfig | None = None,
        spawn: SpawnOptions | None = None,
    ) -> None:
        configs = [e for e in engines if isinstance(e, EngineConfig)]
        bad = [e for e in engines if not isinstance(e, EngineConfig)]
        if bad or not engines:
            raise InvalidRequestError(
                f"serving on Ray needs model engines (EngineConfig), got {bad or 'none'}"
            )
        super().__init__(scheduler=scheduler)
        self.address = address
        self.ray_configs = [with_scheduler_caching(e, self.scheduler_config) for e in configs]
        self.spawn = spawn or SpawnOptions()
        self.proxies: list[RayEngine] = []
        self._connected = False

    async def start(self) -> None:
        """Connect to the cluster, spawn or attach to the engines, start the scheduler."""
        cluster.acquire(self.address)
        self._connected = True
        handles = await spawn_engines(self.ray_configs, self.spawn)
        self.proxies = list(await asyncio.gather(*(RayEngine.connect(h) for h in handles)))
        specs: list[EngineConfig | EngineClient] = list(self.proxies)
        self.engine_specs = specs
        await super().start()
        for proxy in self.proxies:  # the scheduler listens to their health itself
            proxy.start_monitor()

    async def close(self) -> None:
        """Stop the scheduler and the proxies; disconnect (engines this process created end
        with it unless detached)."""
        try:
            await super().close()
            for proxy in self.proxies:
                await proxy.close()
        finally:
            if self._connected:
                self._connected = False
                cluster.release()


async def serve_ray(
    address: str,
    engines: Sequence[EngineConfig | EngineClient],
    config: ServerConfig,
    scheduler: SchedulerConfig | None = None,
    spawn: SpawnOptions | None = None,
) -> None:
    """Serve the HTTP API over the Ray engines until SIGINT/SIGTERM; prints
    "parrot-actors serving on URL" once listening. Raises what `RaySharedRuntime.start` and
    `start_server` raise (`OSError` for a taken port)."""
    runtime = RaySharedRuntime(address, engines, scheduler, spawn)
    await runtime.start()
    try:
        await serve_forever((), config, runtime=runtime, label=" (engines on Ray)")
    finally:
        await runtime.close()


def run_ray(
    address: str,
    engines: Sequence[EngineConfig | EngineClient],
    config: ServerConfig,
    scheduler: SchedulerConfig | None = None,
    spawn: SpawnOptions | None = None,
) -> None:
    """Blocking entry point of `parrot-actors serve --ray ADDRESS` (see `serve_ray`)."""
    asyncio.run(serve_ray(address, engines, config, scheduler, spawn))
