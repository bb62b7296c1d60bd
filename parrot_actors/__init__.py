"""parrot_actors: serving LLM applications as graphs of Semantic Variables.

The public API (names are a contract; see docs/design.md): semantic_function, Variable, Input,
Output, LATENCY, THROUGHPUT, gather, Runtime, connect, ray, EngineConfig, SchedulerConfig, and
the errors. This module is the composition root: the only place that knows every kind of
runtime, so `pa.connect` / `pa.ray` (and `Runtime.connect` / `Runtime.ray`) are wired here and
the embedded runtime imports no client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from parrot_actors.engines.engine import EngineConfig
from parrot_actors.errors import (
    CallError,
    CapacityError,
    EngineError,
    ParrotError,
    SessionError,
    TemplateError,
)
from parrot_actors.runtime import Runtime, gather
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.variables import (
    LATENCY,
    THROUGHPUT,
    Input,
    Output,
    Variable,
    VariableError,
    get_consumers,
    get_perf_objective,
    get_producer,
    prefix_hash,
    semantic_function,
)

if TYPE_CHECKING:
    from parrot_actors.ray.client import RayRuntime
    from parrot_actors.server.client import RemoteRuntime


def connect(url: str, **kwargs: Any) -> RemoteRuntime:
    """The runtime API against a running service at `url` (see `RemoteRuntime` for the
    keywords): `async with pa.connect("http://127.0.0.1:9000") as rt: ...`."""
    from parrot_actors.server.client import RemoteRuntime

    return RemoteRuntime(url, **kwargs)


def ray(address: str = "auto", **kwargs: Any) -> RayRuntime:
    """The runtime API on a Ray cluster (see `RayRuntime` for the keywords): engines and the
    service run as Ray actors; `async with pa.ray(address="auto", engines=2) as rt: ...`.
    Needs the `[ray]` extra."""
    from parrot_actors.ray.client import RayRuntime

    return RayRuntime(address, **kwargs)


Runtime.connect = staticmethod(connect)
Runtime.ray = staticmethod(ray)

__all__ = [
    "LATENCY",
    "THROUGHPUT",
    "CallError",
    "CapacityError",
    "EngineConfig",
    "EngineError",
    "Input",
    "Output",
    "ParrotError",
    "Runtime",
    "SchedulerConfig",
    "SessionError",
    "TemplateError",
    "Variable",
    "VariableError",
    "connect",
    "gather",
    "get_consumers",
    "get_perf_objective",
    "get_producer",
    "prefix_hash",
    "ray",
    "semantic_function",
]
