"""Finding, creating and removing a deployment: the named service actor and its engines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, cast

import msgspec
import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, remove_placement_group

from parrot_actors.engines.engine import EngineConfig
from parrot_actors.errors import ParrotError, SessionError
from parrot_actors.ray import cluster
from parrot_actors.ray.cluster import NAMESPACE, SERVICE_NAME
from parrot_actors.ray.service import ServiceActor
from parrot_actors.ray.spawn import SpawnOptions, find_engine
from parrot_actors.ray.wire import EngineInfo
from parrot_actors.scheduler.config import SchedulerConfig


def engine_configs(
    engines: int | Sequence[EngineConfig] | None, model: str = "default"
) -> list[EngineConfig]:
    """`EngineConfig`s named engine0, engine1, ...: `engines` copies of `model` (an int; None
    means 1), or the configs given (a repeated default name "engine0" is renumbered, as the
    embedded runtime does)."""
    if engines is None or isinstance(engines, int):
        return [EngineConfig(name=f"engine{i}", model=model) for i in range(engines or 1)]
    out = []
    for i, c in enumerate(engines):
        if c.name == "engine0" and i:
            c = msgspec.structs.replace(c, name=f"engine{i}")
        out.append(c)
    return out


def find_service(name: str = SERVICE_NAME) -> ActorHandle[ServiceActor] | None:
    """The handle of the service actor `name`, or None."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


async def connect_service(
    name: str = SERVICE_NAME,
    engines: int | Sequence[EngineConfig] | None = None,
    model: str = "default",
    scheduler: SchedulerConfig | None = None,
    spawn: SpawnOptions | None = None,
    create: bool = True,
    timeout_s: float = 600.0,
) -> ActorHandle[ServiceActor]:
    """The started service actor `name` (a `ServiceActor`): the running one (its engines and
    scheduler config win), else a new one over `engine_configs(engines, model)` when `create`.
    Waits up to `timeout_s` seconds for it to start (engines load their models). Raises
    `SessionError` when there is none and `create` is False, the engines' build errors,
    `CapacityError` when the cluster lacks resources, `TimeoutError` past the timeout."""
    handle = find_service(name)
    created = handle is None
    if handle is None:
        if not create:
            raise SessionError(f"no parrot_actors service named {name!r} on this cluster")
        # Ray types `.remote()` as "handle or the class" (for typed methods); it is the handle.
        handle = cast(
            ActorHandle[ServiceActor],
            ray.remote(ServiceActor)
            .options(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,  # two clients creating it at once get one service
                num_cpus=0,  # the scheduler holds no tensors; engines own the CPU/GPU slots
                max_concurrency=1000,
                max_restarts=-1,
            )
            .remote(engine_configs(engines, model), scheduler, spawn),
        )
    try:
        await asyncio.wait_for(call(handle.start), timeout_s)
    except BaseException:
        if created:  # a service that cannot start must not block the next attempt
            ray.kill(handle, no_restart=True)
        raise
    return handle


async def call(method: Any, *args: object) -> Any:
    """`await method.remote(*args)` with the service's own `ParrotError` re-raised as it was
    raised, and a lost service as `SessionError`. `method` is an actor method (`handle.name`,
    untyped in Ray, hence Any); so is its result: callers annotate what the method returns."""
    try:
        return await method.remote(*args)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ParrotError):
            raise cause from None
        raise
    except RayActorError as exc:
        raise SessionError(f"the parrot_actors service is lost: {exc}") from exc


async def shutdown_deployment(
    name: str = SERVICE_NAME, engines: bool = True, address: str | None = None
) -> list[str]:
    """Stop the service actor `name` and, with `engines`, kill its engine actors and remove
    their placement groups (engines the service created end with it anyway; other services
    attached to those engines lose them too). Returns
    the engine names; nothing happens when there is no such service. Connects to `address`
    for the call when given (else this process must be connected, e.g. inside
    `pa.Runtime.ray`)."""
    if address is not None:
        cluster.acquire(address)
        try:
            return await shutdown_deployment(name, engines)
        finally:
            cluster.release()
    handle = find_service(name)
    if handle is None:
        return []
    names: list[str] = []
    with contextlib.suppress(ParrotError, RayActorError):
        names = await call(handle.engine_names)
        await call(handle.shutdown)
    ray.kill(handle, no_restart=True)
    if engines:
        await kill_engines(names)
    return names


async def kill_engines(names: Sequence[str]) -> None:
    """Kill the engine actors called `names` (no restart) and remove their placement groups."""
    groups: set[str] = set()
    for name in names:
        handle = find_engine(name)
        if handle is None:
            continue
        with contextlib.suppress(ParrotError, RayTaskError, asyncio.TimeoutError):
            info: EngineInfo = await asyncio.wait_for(call(handle.info), 30.0)
            groups.add(info.group)
        ray.kill(handle, no_restart=True)
    for group in groups - {""}:
        # Removing an already removed group is harmless; a bad id must not stop the rest.
        with contextlib.suppress(Exception):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))
