"""Prefix sharing for the scheduler: which prefix context a placed call forks, filling and
freeing those contexts, and making KV room by dropping idle cached ones.

Source: Parrot (OSDI 2024) §6, prompt prefix sharing: calls whose prompts share a prefix
(static: the same leading constant text in any app; dynamic: the same leading variable; or,
unpredicted, the same leading tokens) fork one context filled once, on the engine that holds
it. `PrefixManager` (prefixes.py) keeps the integer and string bookkeeping; this class does the
engine work it decides on. Sharing is at the token level, so outputs never change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Coroutine, Mapping
from typing import Any

from parrot_actors.engines.api import EngineClient
from parrot_actors.errors import ParrotError
from parrot_actors.messages import FillResult
from parrot_actors.scheduler.executor import priority_of
from parrot_actors.scheduler.policy import CallInfo, Placement
from parrot_actors.scheduler.prefixes import PrefixEntry, PrefixManager
from parrot_actors.variables.graph import SemanticCall, prefix_hash

MAX_KEY_LENGTHS = 4096
"""Prefix keys whose token length is remembered (a key is one template's leading text)."""


def token_key(ids: list[int]) -> str:
    """The prefix key of a run of leading token ids ("t:" + a sha256 digest)."""
    return "t:" + hashlib.sha256(repr(ids).encode()).hexdigest()[:24]


def prefix_text(call: SemanticCall, dynamic: bool) -> str:
    """The prompt text a static (leading constant text) or dynamic (text through the first
    input variable's value) prefix covers."""
    text = ""
    for p in call.pieces:
        if p.kind == "text":
            text += p.text
            if not dynamic:
                return text
        elif p.kind == "input":
            if not dynamic:
                return text
            return text + p.variable.value()
        else:
            break
    return text


class PrefixSharing:
    """The prefix contexts of every engine, and the choice of one per placed call.

    engines: name -> engine. static_capacity: idle static prefixes kept (an LRU).
    min_shared_tokens: token-level matching shares a common prefix at least this long.
    `manager` is the bookkeeping (`PrefixManager`).
    """

    def __init__(
        self,
        engines: Mapping[str, EngineClient],
        static_capacity: int,
        min_shared_tokens: int,
    ) -> None:
        self.engines = engines
        self.manager = PrefixManager(static_capacity)
        self.min_shared_tokens = min_shared_tokens
        self._keys: dict[int, list[str]] = {}
        self._lengths: OrderedDict[str, int] = OrderedDict()  # prefix key -> its tokens
        self._background: set[asyncio.Task[None]] = set()

    # ---- a call's keys, from entering the graph to leaving it --------------------------------

    def register(self, call: SemanticCall) -> None:
        """A call entered the graph: count its static and dynamic keys as pending."""
        static, dynamic = prefix_hash(call)
        keys = [k for k in (static, dynamic) if k]
        self._keys[call.id] = keys
        self.manager.add_pending(keys)

    def keys_of(self, call: SemanticCall, ids: list[int], engine: EngineClient) -> tuple[str, ...]:
        """The prefix keys the policy sees for `call` (its token ids `ids`): its static and
        dynamic keys whose prefix spans at least one KV block of `engine` (shorter ones are
        never shared, so they must not pull calls together), and the token key of its first
        `min_shared_tokens` tokens."""
        block = engine.stats().block_size
        keys: list[str] = []
        static, dynamic = prefix_hash(call)
        for key, is_dynamic in ((static, False), (dynamic, True)):
            if key is None:
                continue
            n = self._lengths.get(key)
            if n is None:
                text = prefix_text(call, dynamic=is_dynamic)
                n = len(engine.tokenize(text, first=True)) - 1
                self._lengths[key] = n
                if len(self._lengths) > MAX_KEY_LENGTHS:
                    self._lengths.popitem(last=False)
            if n >= block:
                keys.append(key)
        if len(ids) > self.min_shared_tokens:
            keys.append(token_key(ids[: self.min_shared_tokens]))
        return tuple(keys)

    def release(self, call: SemanticCall, entry: PrefixEntry | None) -> None:
        """The call left the graph (having forked `entry`, if any): free what nobody needs."""
        keys = self._keys.pop(call.id, None)
        if keys is None:
            return
        for e in self.manager.release(keys, entry):
            self._spawn(self._free(e))

    # ---- placement ------------------------------------------------------------------------

    def token_groups(
        self,
        infos: Mapping[int, CallInfo],
        placements: list[Placement],
        ids: Mapping[int, list[int]],
    ) -> dict[int, tuple[str, tuple[int, ...]]]:
        """Token-level sharing: calls placed on one engine in this round whose prompts share
        at least `min_shared_tokens` leading tokens that no prefix key predicted get an ad hoc
        prefix (their common tokens). Returns call id -> (key, tokens)."""
        buckets: dict[tuple[str, str], list[int]] = {}
        for p in placements:
            tkeys = [k for k in infos[p.call_id].prefix_keys if k.startswith("t:")]
            if tkeys:
                buckets.setdefault((tkeys[0], p.engine), []).append(p.call_id)
        out: dict[int, tuple[str, tuple[int, ...]]] = {}
        for members in buckets.values():
            if len(members) < 2:
                continue
            seqs = [ids[i] for i in members]
            n = min(len(s) for s in seqs) - 1
            common = 0
            while common < n and all(s[common] == seqs[0][common] for s in seqs):
                common += 1
            tokens = tuple(seqs[0][:common])
            for i in members:
                out[i] = (token_key(list(tokens)), tokens)
        return out

    def choose(
        self,
        call: SemanticCall,
        engine_name: str,
        ids: list[int],
        ad_hoc: tuple[str, tuple[int, ...]] | None,
    ) -> PrefixEntry | None:
        """The prefix context `call` (token ids `ids`) forks on `engine_name`, created (and
        its fill started) if needed, its tokens cut to whole KV blocks; None when nothing
        worth sharing (a block of tokens) applies."""
        engine = self.engines[engine_name]
        bs = engine.stats().block_size
        static, dynamic = prefix_hash(call)
        options: list[tuple[str, str | None, bool, tuple[int, ...] | None]] = []
        pending = self.manager.pending
        if dynamic and (pending.get(dynamic, 0) >= 2 or self.manager.get(dynamic, engine_name)):
            options.append((dynamic, prefix_text(call, dynamic=True), False, None))
        if static:
            options.append((static, prefix_text(call, dynamic=False), True, None))
        if ad_hoc is not None:
            options.append((ad_hoc[0], None, False, ad_hoc[1]))
        for key, text, is_static, tokens in options:
            entry = self.manager.get(key, engine_name)
            if entry is not None and entry.ready is not None and _failed(entry.ready):
                self.manager.drop(key, engine_name)  # its fill failed: build it again
                entry = None
            if entry is None:
                if tokens is None:
                    tokens = tuple(engine.tokenize(text or "", first=True)[:-1])
                # Whole blocks only: a fork that ends inside a block leaves the child a
                # private partial block, and automatic prefix caching then cannot take the
                # cached blocks after it (a session turn recomputed its whole history).
                tokens = tokens[: len(tokens) // bs * bs]
                if len(tokens) < bs or len(tokens) >= len(ids):
                    continue
                self._track_token_key(call, key)
                entry = self.manager.create(key, engine_name, tokens, is_static)
                entry.ready = asyncio.get_running_loop().create_task(
                    engine.fill(
                        entry.context_id, token_ids=list(tokens), priority=priority_of(call)
                    )
                )
            else:
                self._track_token_key(call, key)
            if tuple(ids[: len(entry.tokens)]) == entry.tokens and len(ids) > len(entry.tokens):
                entry.users += 1
                return entry
        return None

    def _track_token_key(self, call: SemanticCall, key: str) -> None:
        # An ad hoc token prefix lives while a call carrying its key is in the graph.
        keys = self._keys.setdefault(call.id, [])
        if key.startswith("t:") and key not in keys:
            self.manager.add_pending([key])
            keys.append(key)

    def make_room(self, engine_name: str, blocks: int) -> None:
        """Free idle cached static prefixes on an engine with fewer than `blocks` free KV
        blocks (its own eviction would drop their KV anyway; this frees their contexts)."""
        s = self.engines[engine_name].stats()
        free = s.kv_blocks_total - s.kv_blocks_used
        while free < blocks:
            entry = self.manager.evict_idle(engine_name)
            if entry is None:
                return
            free += -(-len(entry.tokens) // s.block_size)
            self._spawn(self._free(entry))

    def forget(self, engine_name: str) -> None:
        """Drop the entries of an engine whose contexts were lost (freeing them only clears
        the engine's record of the loss)."""
        for key, eng in list(self.manager.entries):
            if eng == engine_name:
                self._spawn(self._free(self.manager.drop(key, eng)))

    async def close(self) -> None:
        """Free every prefix context and wait for the frees."""
        for key, eng in list(self.manager.entries):
            self._spawn(self._free(self.manager.drop(key, eng)))
        await asyncio.gather(*list(self._background), return_exceptions=True)

    # ---- background work ------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _free(self, entry: PrefixEntry) -> None:
        with contextlib.suppress(BaseException):
            if entry.ready is not None:
                await entry.ready
        with contextlib.suppress(ParrotError):
            await self.engines[entry.engine].free_context(entry.context_id)


def _failed(fut: asyncio.Future[FillResult]) -> bool:
    return fut.done() and (fut.cancelled() or fut.exception() is not None)
