"""Prefix contexts: shared prompt prefixes filled once per engine and forked by every call.

Source: Parrot (OSDI 2024) §6, "prompt prefix sharing": calls whose prompts share a prefix
(static: the same constant text in any app; dynamic: the same leading variable) fork one
context instead of recomputing it. Integer and string bookkeeping only; `PrefixSharing`
(sharing.py) fills and frees the contexts this manager decides on.

Prefixes are shared at the token level: the prefix context holds the first tokens of the
tokenized prefix text minus its last token (which may merge differently with what follows),
and a call forks it only if its own full tokenization starts with exactly those tokens, so
sharing never changes what the model sees.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from parrot_actors.messages import FillResult


@dataclass(eq=False)
class PrefixEntry:
    """One prefix context on one engine.

    tokens: the prefix's token ids. static: a system-prompt style prefix that may outlive the
    calls needing it (in the LRU cache). users: calls dispatched with it and not finished.
    ready: resolves when the prefix fill finished (raises its error if it failed).
    """

    key: str
    engine: str
    context_id: str
    tokens: tuple[int, ...]
    static: bool
    users: int = 0
    ready: asyncio.Future[FillResult] | None = field(default=None, repr=False)


class PrefixManager:
    """Which prefix contexts exist, who needs them, and when to free them.

    pending: per key, calls registered in the graph (submitted, not finished) that carry it;
    a prefix context lives while its key is pending or users run, and a static one stays in a
    bounded LRU (`static_capacity` entries) after that.
    """

    def __init__(self, static_capacity: int = 8) -> None:
        self.static_capacity = static_capacity
        self.pending: Counter[str] = Counter()
        self.entries: dict[tuple[str, str], PrefixEntry] = {}
        self.idle_static: OrderedDict[tuple[str, str], PrefixEntry] = OrderedDict()
        self._ids = itertools.count()

    def add_pending(self, keys: list[str]) -> None:
        """A call carrying `keys` entered the graph."""
        self.pending.update(keys)

    def get(self, key: str, engine: str) -> PrefixEntry | None:
        """The live entry for `key` on `engine`, if any (taking it out of the idle LRU)."""
        entry = self.entries.get((key, engine))
        if entry is not None:
            self.idle_static.pop((key, engine), None)
        return entry

    def create(self, key: str, engine: str, tokens: tuple[int, ...], static: bool) -> PrefixEntry:
        """A new entry (the actor fills its context)."""
        entry = PrefixEntry(key, engine, f"prefix{next(self._ids)}", tokens, static)
        self.entries[(key, engine)] = entry
        return entry

    def release(self, keys: list[str], entry: PrefixEntry | None) -> list[PrefixEntry]:
        """A call carrying `keys` finished (having used `entry`, if any). Returns the entries
        to free now: no pending call needs them, and static ones beyond the LRU capacity."""
        self.pending.subtract(keys)
        for k in keys:
            if self.pending[k] <= 0:
                del self.pending[k]
        if entry is not None:
            entry.users -= 1
        to_free = []
        for (key, eng), e in list(self.entries.items()):
            if e.users > 0 or self.pending.get(key, 0) > 0:
                continue
            if e.static:
                self.idle_static[(key, eng)] = e
            else:
                to_free.append(self.drop(key, eng))
        while len(self.idle_static) > self.static_capacity:
            (key, eng), _ = self.idle_static.popitem(last=False)
            to_free.append(self.drop(key, eng))
        return to_free

    def evict_idle(self, engine: str) -> PrefixEntry | None:
        """Drop the least recently used idle static prefix on `engine` (KV pressure)."""
        for key, eng in self.idle_static:
            if eng == engine:
                del self.idle_static[(key, eng)]
                return self.drop(key, eng)
        return None

    def drop(self, key: str, engine: str) -> PrefixEntry:
        """Remove the entry for `key` on `engine` (the caller frees its context)."""
        self.idle_static.pop((key, engine), None)
        return self.entries.pop((key, engine))
