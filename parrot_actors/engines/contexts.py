"""Contexts: token sequences whose KV lives in paged blocks, and fork by reference count.

Integers only: a fork that must copy the parent's partial last block returns a `BlockCopy` for
the engine (the owner of the tensors) to carry out. Source: Parrot (Lin et al., OSDI 2024, §6:
contexts, Fill/Generate, fork) and PagedAttention (Kwon et al., SOSP 2023, §4.4: copy-on-write).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from parrot_actors.engines.block_pool import BlockPool
from parrot_actors.errors import ContextNotFoundError, InvalidRequestError


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: sha256 over the previous block's key and this
    block's token ids (int64), so a key names the whole prefix up to the block's end.
    Source: vLLM's automatic prefix caching, which moved to sha256 after GHSA-rm76-4mrf-v9r8
    (Python's `hash` is predictable and collides on purpose-built inputs)."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


@dataclass(frozen=True)
class BlockCopy:
    """Copy KV block `src` into block `dst` in every layer (the first `num_tokens` slots)."""

    src: int
    dst: int
    num_tokens: int


@dataclass(eq=False)
class Context:
    """One context.

    tokens: every token id of the context. num_computed: how many leading tokens have KV in
    `blocks` (the rest are pending: appended by a fill or sampled, not yet computed).
    blocks: block ids covering positions [0, num_computed) (one more may be allocated ahead).
    last_logits: float32 `[vocab]` after the last token, kept while nothing is pending so a
    generate can sample its first token without recomputing anything.
    block_keys: chained keys (`block_key`) of the leading full computed blocks (prefix caching).
    last_used: the engine step at which a request last ran on it (least recently used contexts
    are evicted first). arrival: the engine's sequence number of the fill that started its current
    turn (its requests are ranked by it; None until a request arrives).
    """

    id: str
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    last_logits: torch.Tensor | None = None
    parent_id: str | None = None
    block_keys: list[bytes] = field(default_factory=list)
    last_used: int = 0
    arrival: int | None = None

    @property
    def num_pending(self) -> int:
        """Tokens appended but without KV yet."""
        return len(self.tokens) - self.num_computed


class ContextTable:
    """All live contexts of one engine, over one `BlockPool`.

    Raises `ContextNotFoundError` for unknown ids and `InvalidRequestError` for creating an id
    that exists.
    """

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._contexts: dict[str, Context] = {}
        # A secret root per table: cache keys differ between servers and cannot be precomputed.
        self._root = os.urandom(32)

    def __len__(self) -> int:
        return len(self._contexts)

    def __contains__(self, context_id: str) -> bool:
        return context_id in self._contexts

    def __iter__(self) -> Iterator[Context]:
        return iter(list(self._contexts.values()))

    def find(self, context_id: str) -> Context | None:
        """The live context `context_id`, or None."""
        return self._contexts.get(context_id)

    def get(self, context_id: str) -> Context:
        """The live context `context_id`."""
        ctx = self._contexts.get(context_id)
        if ctx is None:
            raise ContextNotFoundError(
                f"context {context_id!r} does not exist (never created or freed)"
            )
        return ctx

    def create(self, context_id: str) -> Context:
        """A new empty context."""
        if context_id in self._contexts:
            raise InvalidRequestError(f"context {context_id!r} already exists")
        ctx = Context(context_id)
        self._contexts[context_id] = ctx
        return ctx

    def fork(
        self, context_id: str, parent_id: str, num_tokens: int | None = None
    ) -> tuple[Context, BlockCopy | None, int]:
        """A child holding the parent's first `num_tokens` tokens (None: all of them) without
        recomputing them.

        The parent's full computed blocks among those are shared (refcount + 1); a partial
        computed block at the end is copied into a fresh block (returned as a `BlockCopy`, None
        if there is none). Tokens the parent has not computed stay pending in the child.
        Returns (child, copy, reused tokens). Raises `InvalidRequestError` for a `num_tokens`
        outside [0, the parent's length] and `OutOfBlocksError` if the copy needs a block and
        none is free (nothing changes then).
        """
        parent = self.get(parent_id)
        if context_id in self._contexts:
            raise InvalidRequestError(f"context {context_id!r} already exists")
        n = len(parent.tokens) if num_tokens is None else num_tokens
        if not 0 <= n <= len(parent.tokens):
            raise InvalidRequestError(
                f"parent_tokens={num_tokens!r}: context {parent_id!r} holds "
                f"{len(parent.tokens)} tokens"
            )
        computed = min(n, parent.num_computed)
        bs = self.pool.block_size
        full, partial = divmod(computed, bs)
        copy = None
        blocks = parent.blocks[:full]
        if partial:
            (dst,) = self.pool.allocate(1)
            copy = BlockCopy(parent.blocks[full], dst, partial)
            blocks = blocks + [dst]
        self.pool.incref(parent.blocks[:full])
        whole = n == len(parent.tokens) and parent.num_pending == 0
        child = Context(
            context_id,
            tokens=parent.tokens[:n],
            num_computed=computed,
            blocks=blocks,
            last_logits=parent.last_logits if whole else None,
            parent_id=parent_id,
            block_keys=parent.block_keys[:full],
            last_used=parent.last_used,
        )
        self._contexts[context_id] = child
        return child, copy, computed

    def drop_kv(self, ctx: Context) -> None:
        """Release the context's blocks and mark every token pending (preemption or eviction:
        the KV will be recomputed when the context is next used)."""
        self.pool.decref(ctx.blocks)
        ctx.blocks = []
        ctx.num_computed = 0
        ctx.last_logits = None
        ctx.block_keys = []

    def exclusive_blocks(self, ctx: Context) -> int:
        """Blocks of `ctx` that no other owner holds: what dropping its KV would free."""
        return sum(self.pool.refcount(b) == 1 for b in ctx.blocks)

    def free(self, context_id: str) -> Context:
        """Remove the context and release its blocks (shared ones live on in other owners)."""
        ctx = self.get(context_id)
        self.pool.decref(ctx.blocks)
        ctx.blocks = []
        del self._contexts[context_id]
        return ctx

    def ensure_blocks(self, ctx: Context, num_tokens: int) -> None:
        """Allocate blocks so that positions [0, num_tokens) are covered. All or nothing:
        raises `OutOfBlocksError` when the pool has too few free blocks."""
        need = -(-num_tokens // self.pool.block_size) - len(ctx.blocks)
        if need > 0:
            ctx.blocks.extend(self.pool.allocate(need))

    def register_full_blocks(self, ctx: Context) -> None:
        """Key and register every newly completed full block of `ctx` (prefix caching)."""
        bs = self.pool.block_size
        full = min(ctx.num_computed // bs, len(ctx.blocks))
        for i in range(len(ctx.block_keys), full):
            tokens = tuple(ctx.tokens[i * bs : (i + 1) * bs])
            key = block_key(ctx.block_keys[i - 1] if i else self._root, tokens)
            ctx.block_keys.append(key)
            self.pool.register(ctx.blocks[i], key, tokens)

    def match_cached(self, ctx: Context) -> int:
        """Take cached blocks for the context's pending tokens, from a block boundary on; at
        least one token stays pending (its logits are needed). A block is taken only if its
        stored tokens equal the context's. Returns tokens reused."""
        bs = self.pool.block_size
        start = ctx.num_computed // bs
        if ctx.num_computed % bs or len(ctx.blocks) > start or len(ctx.block_keys) != start:
            return 0
        reused = 0
        for i in range(start, (len(ctx.tokens) - 1) // bs):
            tokens = tuple(ctx.tokens[i * bs : (i + 1) * bs])
            key = block_key(ctx.block_keys[i - 1] if i else self._root, tokens)
            block = self.pool.lookup(key, tokens)
            if block is None:
                break
            ctx.blocks.append(block)
            ctx.block_keys.append(key)
            ctx.num_computed += bs
            reused += bs
        return reused

    def blocks_needed(self, ctx: Context, num_tokens: int) -> int:
        """New blocks that `ensure_blocks(ctx, num_tokens)` would allocate."""
        return max(0, -(-num_tokens // self.pool.block_size) - len(ctx.blocks))
