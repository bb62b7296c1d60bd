"""Messages between engine actors and their proxies (msgspec structs; Ray pickles them as
they are). Clients and the service speak HTTP (`parrot_actors.server.protocol`); engine errors
cross Ray as the raised `ParrotError` itself (the proxy unwraps `RayTaskError`)."""

from __future__ import annotations

from typing import Any

import msgspec

from parrot_actors.messages import EngineStats


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a proxy learns from an engine actor. incarnation: a new id after each restart
    (a restarted actor holds no contexts). group: its placement group's id (hex)."""

    name: str
    model_name: str
    aliases: tuple[str, ...]
    incarnation: str
    group: str = ""
    stats: EngineStats


class EngineStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A proxy's view of its engine actor: healthy (False while Ray restarts it), the current
    incarnation, restarts seen and contexts refilled after restarts."""

    name: str
    healthy: bool
    incarnation: str
    restarts: int
    replays: int


class OpResult(msgspec.Struct, frozen=True):
    """An engine actor's answer: the operation's result, the actor's incarnation and the
    engine's stats after the operation."""

    value: Any
    incarnation: str
    stats: EngineStats
