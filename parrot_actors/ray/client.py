"""`pa.Runtime.ray(address)`: the embedded runtime's Python API against a Ray deployment.

`async with pa.Runtime.ray(address="auto", engines=2) as rt:` connects to the cluster, finds
the named service actor (creating it, with its engines, when absent), asks it where its HTTP
service listens, and from then on is exactly `pa.Runtime.connect(url)` (a `RemoteRuntime`):
dependent calls run without client round trips, `await var` is one server-side wait, errors
come back as the same typed exceptions (`CallError` chained to e.g. `EngineDiedError`), and
`rt.stats()` / `rt.call_log()` are the session's own. `health()` and `engine_status()` read the
deployment's engines through Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.actor import ActorHandle

from parrot_actors.engines.engine import EngineConfig
from parrot_actors.errors import TemplateError
from parrot_actors.ray import cluster
from parrot_actors.ray.cluster import SERVICE_NAME
from parrot_actors.ray.deploy import call, connect_service
from parrot_actors.ray.service import Endpoint, ServiceActor
from parrot_actors.ray.spawn import SpawnOptions
from parrot_actors.ray.wire import EngineStatus
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.server.client import RemoteRuntime


class RayRuntime(RemoteRuntime):
    """The Parrot API on a Ray deployment, used like `pa.Runtime` (see the module docstring).

    address: the cluster ("auto": the local or job's cluster, "HOST:PORT", "ray://HOST:PORT").
    engines: engine count or `EngineConfig`s, and model: their model, used only when the
    service does not exist yet (then created, detached: it outlives this client). scheduler:
    its `SchedulerConfig` (also only at creation). service: the service actor's name.
    create: create a missing service (else `SessionError`). max_restarts: times Ray restarts a
    dead engine actor. spawn: full `SpawnOptions` (overrides max_restarts). timeout_s: seconds
    to wait for the service to start (model loads). Other keywords go to `RemoteRuntime`.

    Errors: `start` raises `ConnectionError` (no cluster), the service's start errors and
    `TimeoutError` past `timeout_s`; everything else as `RemoteRuntime`.
    """

    def __init__(
        self,
        address: str = "auto",
        *,
        engines: int | Sequence[EngineConfig] | None = None,
        model: str = "default",
        scheduler: SchedulerConfig | None = None,
        service: str = SERVICE_NAME,
        create: bool = True,
        max_restarts: int = 3,
        spawn: SpawnOptions | None = None,
        timeout_s: float = 600.0,
        **remote: Any,  # `RemoteRuntime`'s keywords, passed on as they are
    ) -> None:
        super().__init__("http://unresolved", **remote)  # the service says where it listens
        self.address = address
        self.engines = engines
        self.model = model
        self.scheduler_config = scheduler
        self.service_name = service
        self.create = create
        self.spawn = spawn or SpawnOptions(max_restarts=max_restarts)
        self.timeout_s = timeout_s
        self.service: ActorHandle[ServiceActor] | None = None
        self._connected = False

    async def start(self) -> None:
        """Connect, find or create the service, then open a session over its HTTP API."""
        cluster.acquire(self.address)
        self._connected = True
        try:
            service = self.service = await connect_service(
                self.service_name,
                self.engines,
                self.model,
                self.scheduler_config,
                self.spawn,
                self.create,
                self.timeout_s,
            )
            endpoint: Endpoint = await call(service.start)
            self.url = endpoint.url
            self.set_api_key(endpoint.api_key)
            await super().start()
        except BaseException:
            self._disconnect()
            raise

    async def close(self) -> None:
        """End the session (its unfinished calls are cancelled), then disconnect."""
        try:
            await super().close()
        finally:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._connected:
            self._connected = False
            cluster.release()

    async def health(self) -> dict[str, bool]:
        """Engine name -> healthy (False while Ray restarts its actor)."""
        health: dict[str, bool] = await call(self._service().health)
        return health

    async def engine_status(self) -> list[EngineStatus]:
        """Each engine's health, incarnation, restarts seen and contexts refilled."""
        status: list[EngineStatus] = await call(self._service().engine_status)
        return status

    def _service(self) -> ActorHandle[ServiceActor]:
        if self.service is None:
            raise TemplateError("the Ray runtime is not started: use `async with`")
        return self.service
