"""Contexts: token sequences whose KV lives in paged blocks, and fork by reference count.

Integers only: a fork that must copy the parent's partial last block returns a `BlockCopy` for
the engine (the owner of the tensors) to carry out. Source: Parrot (Lin et al., OSDI 2024, §6:
contexts, Fill/Generate, fork) and PagedAttention (Kwon et al., SOSP 2023, §4.4: copy-on-write).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parrot_actors.engines.block_pool import BlockPool
from parrot_actors.errors import ContextNotFoundError, InvalidRequestError


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
    block_hashes: chained hashes of the leading full computed blocks (prefix caching).
    """

    id: str
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    last_logits: torch.Tensor | None = None
    parent_id: str | None = None
    block_hashes: list[int] = field(default_factory=list)

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

    def __len__(self) -> int:
        return len(self._contexts)

    def __contains__(self, context_id: str) -> bool:
        return context_id in self._contexts

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

    def fork(self, context_id: str, parent_id: str) -> tuple[Context, BlockCopy | None, int]:
        """A child holding the parent's tokens without recomputing them.

        The parent's full computed blocks are shared (refcount + 1); its partial last computed
        block is copied into a fresh block (returned as a `BlockCopy`, None if there is none).
        Pending parent tokens stay pending in the child. Returns (child, copy, reused tokens).
        Raises `OutOfBlocksError` if the copy needs a block and none is free (nothing changes).
        """
        parent = self.get(parent_id)
        if context_id in self._contexts:
            raise InvalidRequestError(f"context {context_id!r} already exists")
        bs = self.pool.block_size
        full, partial = divmod(parent.num_computed, bs)
        copy = None
        blocks = parent.blocks[:full]
        if partial:
            (dst,) = self.pool.allocate(1)
            copy = BlockCopy(parent.blocks[full], dst, partial)
            blocks = blocks + [dst]
        self.pool.incref(parent.blocks[:full])
        child = Context(
            context_id,
            tokens=list(parent.tokens),
            num_computed=parent.num_computed,
            blocks=blocks,
            last_logits=parent.last_logits if parent.num_pending == 0 else None,
            parent_id=parent_id,
            block_hashes=parent.block_hashes[:full],
        )
        self._contexts[context_id] = child
        return child, copy, parent.num_computed

    def drop_kv(self, ctx: Context) -> None:
        """Release the context's blocks and mark every token pending (preemption: the KV will
        be recomputed)."""
        self.pool.decref(ctx.blocks)
        ctx.blocks = []
        ctx.num_computed = 0
        ctx.last_logits = None
        ctx.block_hashes = []

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
        """Hash and register every newly completed full block of `ctx` (prefix caching)."""
        bs = self.pool.block_size
        full = ctx.num_computed // bs
        for i in range(len(ctx.block_hashes), full):
            parent = ctx.block_hashes[i - 1] if i else 0
            h = hash((parent, tuple(ctx.tokens[i * bs : (i + 1) * bs])))
            ctx.block_hashes.append(h)
            self.pool.register(ctx.blocks[i], h)

    def match_cached(self, ctx: Context) -> int:
        """Take cached blocks for the context's pending tokens, from a block boundary on; at
        least one token stays pending (its logits are needed). Returns tokens reused."""
        bs = self.pool.block_size
        start = ctx.num_computed // bs
        if ctx.num_computed % bs or len(ctx.blocks) > start or len(ctx.block_hashes) != start:
            return 0
        reused = 0
        for i in range(start, (len(ctx.tokens) - 1) // bs):
            parent = ctx.block_hashes[i - 1] if i else 0
            h = hash((parent, tuple(ctx.tokens[i * bs : (i + 1) * bs])))
            block = self.pool.lookup(h)
            if block is None:
                break
            ctx.blocks.append(block)
            ctx.block_hashes.append(h)
            ctx.num_computed += bs
            reused += bs
        return reused

    def blocks_needed(self, ctx: Context, num_tokens: int) -> int:
        """New blocks that `ensure_blocks(ctx, num_tokens)` would allocate."""
        return max(0, -(-num_tokens // self.pool.block_size) - len(ctx.blocks))
