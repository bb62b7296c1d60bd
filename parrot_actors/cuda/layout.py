"""The integer description of one engine step's batch, shared by every attention backend.

The engine builds one `BatchLayout` per step; each backend turns it into its own index tensors
once (`AttentionBackend.plan`) and reuses them in every layer. Everything here is plain Python
integers, so it is unit-tested on the CPU.

Token order in a step: the new tokens of every prefill sequence (in `prefills` order), then one
token per decode sequence (in `decodes` order). Query tensors are `[num_tokens, num_heads,
head_dim]` in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SeqLayout:
    """One sequence in a step.

    query_len: new tokens computed this step (1 for a decode).
    kv_len: tokens with KV after this step, the new ones included (so the first new token sits at
    position kv_len - query_len).
    block_table: ids of the KV blocks holding positions [0, kv_len), in order; exactly
    ceil(kv_len / block_size) of them.
    """

    query_len: int
    kv_len: int
    block_table: tuple[int, ...]


@dataclass(frozen=True)
class CascadeGroup:
    """Decode sequences that share their first `shared_blocks` KV blocks (same block ids).

    members: indices into `BatchLayout.decodes`, consecutive and ascending (the decode order is
    arranged so that groups are contiguous). Each member's own part is its blocks after the
    shared ones. Source: FlashInfer cascade attention (MultiLevelCascadeAttentionWrapper docs;
    "Cascade Inference", FlashInfer blog 2024): attend to the shared KV once per group, then to
    each request's own KV, and merge the two partial results by their log-sum-exp.
    """

    members: tuple[int, ...]
    shared_blocks: int


@dataclass(frozen=True)
class BatchLayout:
    """All sequences of one step. `cascade_groups` is empty when the step uses plain paged
    decode; otherwise every decode sequence is in exactly one group (a lone sequence is a group
    of one with `shared_blocks == 0`)."""

    block_size: int
    prefills: tuple[SeqLayout, ...] = ()
    decodes: tuple[SeqLayout, ...] = ()
    cascade_groups: tuple[CascadeGroup, ...] = field(default=())

    @property
    def num_prefill_tokens(self) -> int:
        """New tokens of all prefill sequences."""
        return sum(s.query_len for s in self.prefills)

    @property
    def num_tokens(self) -> int:
        """All new tokens of the step (prefill tokens, then one per decode)."""
        return self.num_prefill_tokens + len(self.decodes)

    def sequences(self) -> tuple[SeqLayout, ...]:
        """Prefills then decodes, the order of the step's tokens."""
        return self.prefills + self.decodes


def common_prefix_blocks(tables: list[tuple[int, ...]]) -> int:
    """Number of leading block ids that every table in `tables` has in common."""
    if not tables:
        return 0
    n = min(len(t) for t in tables)
    first = tables[0]
    for i in range(n):
        if any(t[i] != first[i] for t in tables[1:]):
            return i
    return n


def plan_cascade(
    decodes: list[SeqLayout], block_size: int, min_shared_blocks: int = 1
) -> tuple[list[SeqLayout], list[CascadeGroup]]:
    """Order decode sequences so that those sharing leading blocks are contiguous, and group them.

    Sequences are grouped by their first block id (forks of one parent start with the same
    block); a group's shared part is the members' common leading blocks, capped so that every
    member keeps at least one block of its own (the block its new token is written to is never
    shared). Groups smaller than two, or sharing fewer than `min_shared_blocks` blocks, become
    lone groups with `shared_blocks == 0`.

    Returns (reordered decodes, groups); groups is empty when no group shares anything, so the
    caller can use plain paged decode. Stable: within a group, members keep their input order.
    """
    buckets: dict[int, list[int]] = {}
    for i, s in enumerate(decodes):
        key = s.block_table[0] if s.block_table else -1 - i
        buckets.setdefault(key, []).append(i)
    ordered: list[SeqLayout] = []
    groups: list[CascadeGroup] = []
    any_shared = False
    for idxs in buckets.values():
        tables = [decodes[i].block_table for i in idxs]
        shared = common_prefix_blocks(tables) if len(idxs) > 1 else 0
        shared = min(shared, min(len(t) for t in tables) - 1)
        if shared < max(min_shared_blocks, 1):
            shared = 0
        start = len(ordered)
        ordered.extend(decodes[i] for i in idxs)
        if shared:
            any_shared = True
            groups.append(CascadeGroup(tuple(range(start, len(ordered))), shared))
        else:
            groups.extend(CascadeGroup((j,), 0) for j in range(start, len(ordered)))
    return ordered, (groups if any_shared else [])
