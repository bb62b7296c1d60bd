"""The KV block pool: block ids, reference counts and the free list. Integers only, no tensors.

The pool is the one owner of block ids. A block with refcount > 1 is shared (a forked parent's
full blocks) and must not be written; `BlockPool.refcount` tells the engine which blocks an
eviction would actually free. Source: PagedAttention (Kwon et al., SOSP 2023, §4.2-4.4: block
tables, reference counts, copy-on-write on fork).

Automatic prefix caching keeps a registry of full blocks by key (a chained sha256 digest computed
by `contexts.block_key`) together with the token ids each block holds. A lookup hits only if the
stored tokens equal the asked ones, so even a key collision can never hand one sequence the KV of
another (the fix vLLM made after GHSA-rm76-4mrf-v9r8).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from parrot_actors.errors import EngineError


class OutOfBlocksError(EngineError):
    """The pool has fewer free blocks than asked for (the engine preempts or waits)."""


class BlockPool:
    """A fixed set of `num_blocks` KV blocks, each holding `block_size` tokens.

    Raises `OutOfBlocksError` when an allocation cannot be satisfied (nothing is allocated then)
    and `ValueError` on a refcount underflow or an unknown block id (an engine bug, never user
    input).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks}, block_size={block_size}: both must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refcount = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._tokens_of: dict[int, tuple[int, ...]] = {}
        self.peak_used = 0
        """The most blocks with refcount > 0 at once since the pool was made."""

    @property
    def num_free(self) -> int:
        """Blocks with refcount 0 (cached ones included: they are evicted on demand)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        """Blocks with refcount > 0."""
        return self.num_blocks - self.num_free

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a registered prefix."""
        return len(self._cached_free)

    def register(self, block_id: int, key: bytes, tokens: tuple[int, ...]) -> None:
        """Record that `block_id` (full, computed) holds `tokens` (block_size ids) under `key`.
        A key already held by another block is left alone (the first copy wins)."""
        if key in self._block_of or block_id in self._key_of:
            return
        self._key_of[block_id] = key
        self._block_of[key] = block_id
        self._tokens_of[block_id] = tokens

    def lookup(self, key: bytes, tokens: tuple[int, ...]) -> int | None:
        """The block registered under `key` whose stored tokens equal `tokens`, with one more
        reference taken, or None (a miss, also when the key matches but the tokens differ)."""
        b = self._block_of.get(key)
        if b is None or self._tokens_of[b] != tokens:
            return None
        if self._refcount[b] == 0:
            del self._cached_free[b]
        self._refcount[b] += 1
        self.peak_used = max(self.peak_used, self.num_used)
        return b

    def refcount(self, block_id: int) -> int:
        """Current reference count of `block_id` (0: free)."""
        return self._refcount[block_id]

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (refcount 1 each). All or nothing: raises `OutOfBlocksError`."""
        if n > self.num_free:
            raise OutOfBlocksError(f"need {n} KV blocks, {self.num_free} free")
        ids = []
        for _ in range(n):
            if self._free:
                ids.append(self._free.popleft())
            else:  # evict the least recently used cached block
                b, _ = self._cached_free.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
                del self._tokens_of[b]
                ids.append(b)
        for b in ids:
            self._refcount[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return ids

    def incref(self, block_ids: list[int]) -> None:
        """Add one owner to each block (a fork sharing the parent's full blocks)."""
        for b in block_ids:
            if self._refcount[b] <= 0:
                raise ValueError(f"incref of free block {b}")
            self._refcount[b] += 1

    def decref(self, block_ids: list[int]) -> list[int]:
        """Drop one owner from each block; return the ids that became free."""
        freed = []
        for b in block_ids:
            if self._refcount[b] <= 0:
                raise ValueError(f"decref of free block {b}")
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                freed.append(b)
                if b in self._key_of:
                    self._cached_free[b] = None
                else:
                    self._free.append(b)
        return freed
