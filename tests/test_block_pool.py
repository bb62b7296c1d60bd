from __future__ import annotations

import pytest

from parrot_actors.engines.block_pool import BlockPool, OutOfBlocksError
from parrot_actors.engines.contexts import BlockCopy, ContextTable
from parrot_actors.errors import ContextNotFoundError, InvalidRequestError


def test_allocate_and_free_counts():
    pool = BlockPool(4, 16)
    a = pool.allocate(3)
    assert a == [0, 1, 2]
    assert (pool.num_used, pool.num_free) == (3, 1)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(2)
    assert pool.num_free == 1  # all or nothing
    pool.incref([0])
    assert pool.decref([0, 1]) == [1]
    assert pool.refcount(0) == 1
    assert pool.decref([0, 2]) == [0, 2]
    assert pool.num_used == 0
    assert pool.peak_used == 3  # the high-water mark outlives the frees
    with pytest.raises(ValueError):
        pool.decref([0])


def test_fork_shares_full_blocks_and_copies_partial():
    pool = BlockPool(10, 4)
    table = ContextTable(pool)
    parent = table.create("p")
    parent.tokens = list(range(10))
    table.ensure_blocks(parent, 10)
    parent.num_computed = 10
    assert parent.blocks == [0, 1, 2]
    child, copy, reused = table.fork("c", "p")
    assert reused == 10
    assert child.blocks == [0, 1, 3]
    assert copy == BlockCopy(src=2, dst=3, num_tokens=2)
    assert [pool.refcount(b) for b in range(4)] == [2, 2, 1, 1]
    table.free("p")
    assert [pool.refcount(b) for b in range(4)] == [1, 1, 0, 1]
    assert pool.num_used == 3
    table.free("c")
    assert pool.num_used == 0


def test_fork_at_block_boundary_copies_nothing():
    pool = BlockPool(4, 4)
    table = ContextTable(pool)
    parent = table.create("p")
    parent.tokens = list(range(8))
    table.ensure_blocks(parent, 8)
    parent.num_computed = 8
    child, copy, _ = table.fork("c", "p")
    assert copy is None and child.blocks == [0, 1]
    assert pool.num_used == 2


def test_context_errors():
    table = ContextTable(BlockPool(2, 4))
    table.create("a")
    with pytest.raises(InvalidRequestError, match="'a' already exists"):
        table.create("a")
    with pytest.raises(ContextNotFoundError, match="'zz'"):
        table.fork("b", "zz")
    table.free("a")
    with pytest.raises(ContextNotFoundError):
        table.get("a")


def test_prefix_cache_keeps_freed_blocks_until_evicted():
    pool = BlockPool(3, 4)
    a, b = pool.allocate(2)
    ta, tb = (1, 2, 3, 4), (5, 6, 7, 8)
    pool.register(a, b"ka", ta)
    pool.register(b, b"kb", tb)
    pool.register(b, b"kc", tb)  # a block keeps its first key
    pool.decref([a, b])
    assert (pool.num_free, pool.num_cached_free, pool.num_used) == (3, 2, 0)
    assert pool.lookup(b"ka", ta) == a and pool.refcount(a) == 1
    assert pool.lookup(b"kc", tb) is None
    assert pool.num_cached_free == 1
    # The plain free block goes first, then the least recently used cached one (b).
    assert pool.allocate(2) == [2, b]
    assert pool.lookup(b"kb", tb) is None
    pool.decref([a])
    assert pool.lookup(b"ka", ta) == a


def test_a_key_hit_with_other_tokens_is_a_miss():
    pool = BlockPool(2, 4)
    (a,) = pool.allocate(1)
    pool.register(a, b"same-key", (1, 2, 3, 4))
    pool.decref([a])
    assert pool.lookup(b"same-key", (1, 2, 3, 5)) is None  # a collision shares nothing
    assert pool.num_cached_free == 1 and pool.refcount(a) == 0
    assert pool.lookup(b"same-key", (1, 2, 3, 4)) == a
