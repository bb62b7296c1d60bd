"""Names and the connection to a Ray cluster, shared by every part of `parrot_actors.ray`."""

from __future__ import annotations

import logging
import threading

import ray

NAMESPACE = "parrot_actors"
"""The Ray namespace of every named actor of a deployment."""
SERVICE_NAME = "parrot_actors.scheduler"
"""The default name of the scheduler (service) actor."""
ENGINE_PREFIX = "parrot_actors.engine."
"""Engine actors are named ENGINE_PREFIX + engine name."""
PG_PREFIX = "parrot_actors.engines."
"""Placement groups of engines are named PG_PREFIX + a unique suffix."""

_lock = threading.Lock()
_users = 0
_owned = False


def engine_actor_name(engine_name: str) -> str:
    """The Ray actor name of the engine called `engine_name`."""
    return ENGINE_PREFIX + engine_name


def acquire(address: str) -> None:
    """Connect this process to the cluster at `address` ("auto", "HOST:PORT" or
    "ray://HOST:PORT") unless it is connected already; pair every call with `release()`.
    Raises `ConnectionError` when no cluster answers there (Ray's own error)."""
    global _users, _owned
    with _lock:
        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
            _owned = True
        _users += 1


def release() -> None:
    """Undo one `acquire()`; the last one disconnects if `acquire` connected."""
    global _users, _owned
    with _lock:
        _users = max(0, _users - 1)
        if _users == 0 and _owned:
            _owned = False
            ray.shutdown()
