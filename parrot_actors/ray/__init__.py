"""The same actors on a Ray cluster (needs the `[ray]` extra: `pip install 'parrot_actors[ray]'`).

Layout of a deployment, all in the Ray namespace `parrot_actors`:

- one engine actor per engine (`EngineActor`, named `parrot_actors.engine.<name>`, owned by
  the service actor), each in its own bundle of a placement group ({"CPU": n} or
  {"GPU": 1}), restarted by Ray (`max_restarts`) when it dies;
- the service: a named, detached actor (`ServiceActor`, named `parrot_actors.scheduler`)
  serving the HTTP API (`parrot_actors.server`) over the unchanged `Runtime` + `Scheduler`,
  whose engines are local proxies (`RayEngine`) of the engine actors;
- clients: `pa.Runtime.ray(address)` (a `RayRuntime`, which is a `RemoteRuntime`) finds the
  service by name, asks for its URL and key, and speaks HTTP to it; `parrot_actors.ray.serve`
  (`parrot-actors serve --ray`) runs the same server in its own process instead.

Nothing outside this package imports Ray, so the rest of parrot_actors works without it. The
package is callable: `parrot_actors.ray(address, ...)` is `pa.ray`, a `RayRuntime`.
"""

from __future__ import annotations

try:
    import ray as _ray  # noqa: F401
except ImportError as exc:  # the optional extra is missing: say how to get it
    raise ImportError(
        "parrot_actors.ray needs Ray: pip install 'parrot_actors[ray]' (ray[default])"
    ) from exc

import sys
import types
from typing import Any

from parrot_actors.ray.client import RayRuntime
from parrot_actors.ray.cluster import ENGINE_PREFIX, NAMESPACE, SERVICE_NAME
from parrot_actors.ray.deploy import shutdown_deployment


class _CallableModule(types.ModuleType):
    # Importing this package makes it the attribute `parrot_actors.ray`, where the factory
    # `pa.ray(...)` stood; calling the package keeps meaning that factory.
    # Any: the keywords go as they are to `RayRuntime` (as `pa.ray`'s do).
    def __call__(self, address: str = "auto", **kwargs: Any) -> RayRuntime:
        return RayRuntime(address, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["ENGINE_PREFIX", "NAMESPACE", "SERVICE_NAME", "RayRuntime", "shutdown_deployment"]
