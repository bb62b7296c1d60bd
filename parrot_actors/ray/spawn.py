"""The spawner: engine actors on a Ray cluster, placed by resources with a placement group.

Local engines are `Engine.start(config)`; on Ray each engine is an `EngineActor` in its own
placement-group bundle: {"GPU": 1} for a CUDA engine (one engine per GPU), else {"CPU": n}
(one engine per CPU slot). Engines are named actors (`engine_actor_name`), so a second
deployment or an HTTP server on the same cluster attaches to them instead of loading the model
again. Sources: Ray docs, "Placement Groups", "Named Actors", "Actor Lifetimes",
"Fault Tolerance: Actors" (max_restarts, max_task_retries).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import cast

import msgspec
import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from parrot_actors.engines.engine import EngineConfig
from parrot_actors.errors import CapacityError, InvalidRequestError
from parrot_actors.ray.cluster import NAMESPACE, PG_PREFIX, engine_actor_name
from parrot_actors.ray.engine_actor import EngineActor


class SpawnOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How engine actors are placed and kept alive.

    max_restarts: times Ray restarts a dead engine actor (-1: always). cpus_per_engine: CPU
    slots of a CPU engine's bundle. strategy: placement-group strategy ("PACK", "SPREAD",
    "STRICT_PACK", "STRICT_SPREAD"). detached: engines outlive the process or actor that created
    them; by default they share its fate (the service actor's for a deployment, so stopping
    the service stops its engines; Ray also advises against restartable detached actors in
    placement groups). timeout_s: seconds to wait for the bundles to be reserved.
    """

    max_restarts: int = 3
    cpus_per_engine: int = 1
    strategy: str = "PACK"
    detached: bool = False
    timeout_s: float = 300.0


def bundle_of(config: EngineConfig, options: SpawnOptions) -> dict[str, float]:
    """The resources one engine reserves: a GPU for a CUDA engine, else CPU slots."""
    if config.device.startswith("cuda"):
        return {"GPU": 1.0}
    return {"CPU": float(options.cpus_per_engine)}


def actor_config(config: EngineConfig, options: SpawnOptions) -> EngineConfig:
    """`config` as the actor runs it: Ray shows an actor only its own GPU (so "cuda:N" becomes
    "cuda"), and a CPU engine uses as many torch threads as CPU slots it reserved."""
    if config.device.startswith("cuda"):
        return msgspec.structs.replace(config, device="cuda")
    threads = config.num_threads or options.cpus_per_engine
    return msgspec.structs.replace(config, num_threads=threads)


def find_engine(name: str) -> ActorHandle[EngineActor] | None:
    """The handle of the engine actor for engine `name`, or None if there is none."""
    try:
        return ray.get_actor(engine_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


async def spawn_engines(
    configs: Sequence[EngineConfig], options: SpawnOptions | None = None
) -> list[ActorHandle[EngineActor]]:
    """Handles of engine actors for `configs`, in order: existing actors of the same names are
    reused; the others are created in one new placement group (one bundle each). Raises
    `InvalidRequestError` for duplicate names and `CapacityError` when the cluster cannot
    reserve the bundles within `timeout_s` (the message names what was asked and what is free).
    """
    options = options or SpawnOptions()
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"engine names must differ, got {names}")
    found = {c.name: find_engine(c.name) for c in configs}
    handles = {name: h for name, h in found.items() if h is not None}
    missing = [c for c in configs if c.name not in handles]
    if missing:
        pg_name = PG_PREFIX + uuid.uuid4().hex[:8]
        pg = await _reserve([bundle_of(c, options) for c in missing], options, pg_name)
        for i, config in enumerate(missing):
            handles[config.name] = _create(config, options, pg, i)
    return [handles[c.name] for c in configs]


async def _reserve(
    bundles: list[dict[str, float]], options: SpawnOptions, name: str
) -> PlacementGroup:
    pg: PlacementGroup = placement_group(
        bundles,
        strategy=options.strategy,
        name=name,
        lifetime="detached" if options.detached else None,
    )
    try:
        await asyncio.wait_for(_ready(pg), options.timeout_s)
    except asyncio.TimeoutError:
        remove_placement_group(pg)
        # Ray leaves `available_resources` unannotated: it returns resource name -> quantity.
        available = cast(Callable[[], dict[str, float]], ray.available_resources)()
        raise CapacityError(
            f"the cluster could not reserve {bundles} for the engines within "
            f"{options.timeout_s:.0f} s; available now: {available}"
        ) from None
    return pg


async def _ready(pg: PlacementGroup) -> None:
    await pg.ready()


def _create(
    config: EngineConfig, options: SpawnOptions, pg: PlacementGroup, index: int
) -> ActorHandle[EngineActor]:
    gpu = config.device.startswith("cuda")
    actor = ray.remote(EngineActor).options(
        name=engine_actor_name(config.name),
        namespace=NAMESPACE,
        get_if_exists=True,  # another client creating the same engine concurrently
        lifetime="detached" if options.detached else None,
        max_restarts=options.max_restarts,
        max_task_retries=0,  # a call in flight when the actor dies fails; the scheduler decides
        num_cpus=0 if gpu else options.cpus_per_engine,
        num_gpus=1 if gpu else 0,
        max_concurrency=1000,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=index
        ),
    )
    # Ray types `.remote()` as "handle or the class" (for typed methods); it is the handle.
    return cast(ActorHandle[EngineActor], actor.remote(actor_config(config, options), pg.id.hex()))
