"""Turn a `BatchLayout` into the integer plan arguments of FlashInfer's paged-attention wrappers.

Pure Python (ints and lists, no torch, no flashinfer), so every index is unit-tested on the CPU;
`flashinfer_backend.FlashInferAttention` only converts these lists to int32 tensors.

FlashInfer's paged KV format (docs.flashinfer.ai, "KV-Cache Layout in FlashInfer", and the
`plan()` docstrings of `BatchPrefillWithPagedKVCacheWrapper` / `BatchDecodeWithPagedKVCacheWrapper`
/ `MultiLevelCascadeAttentionWrapper`, flashinfer-python 0.6.x) is CSR over requests:

- `qo_indptr` `[batch + 1]`: request i's queries are rows `qo_indptr[i]:qo_indptr[i + 1]` of q.
- `kv_indptr` `[batch + 1]`: request i's pages are `kv_indices[kv_indptr[i]:kv_indptr[i + 1]]`.
- `kv_indices` `[kv_indptr[-1]]`: page (= engine block) ids, in KV order.
- `kv_last_page_len` `[batch]`: tokens used in request i's last page, in `[1, page_size]`: a full
  last page counts `page_size`, never 0 (the decode docs' example states
  `1 <= kv_last_page_len <= page_size`). FlashInfer derives
  `kv_len = (num_pages - 1) * page_size + last_page_len` (`flashinfer.page.get_seq_lens`).

Plans built here (see `plan_indices`):

- Prefill: `BatchPrefillWithPagedKVCacheWrapper`, one entry per prefill sequence, causal. FlashInfer
  aligns the causal mask bottom-right (query j of a request with `qo_len` queries sits at KV
  position `kv_len - qo_len + j`), which is `SeqLayout`'s convention, so a prefill that extends an
  existing context (a fill after a fork) needs nothing special.
- Plain paged decode: `BatchDecodeWithPagedKVCacheWrapper`, one entry per decode sequence (its
  qo_indptr is implicitly `[0, 1, ..., batch]`; we still compute it, the prefill wrapper would
  take the same lists). Chosen over the prefill wrapper with qo_len 1 because it is FlashInfer's
  kernel specialised for one query per request (split-KV over long contexts, CUDA-core kernel
  for MHA / small GQA groups, tensor-core kernel for large groups), the path vLLM and SGLang use
  for decode, and the honest baseline for the cascade benchmark.
- Cascade decode: `MultiLevelCascadeAttentionWrapper` with 2 levels. Level 0: one entry per
  `CascadeGroup` with `shared_blocks > 0`: the group's shared blocks (all full pages, so
  last_page_len == page_size), qo_indptr grouping the members' queries (non-causal). Level 1:
  one entry per member: its blocks after the shared ones, qo_indptr `[0, 1, ..., n]`.

Zero-length KV entries (lone groups). `MultiLevelCascadeAttentionWrapper.run` runs every level
on the *same* q and merges level 0 into level 1 with `merge_state_in_place` (flashinfer
cascade.py), so every query must appear in level 0. A lone decode (`shared_blocks == 0`) would
need a level-0 entry with zero pages. FlashInfer does not document that as supported: its host
side computes `kv_len = clamp(num_pages - 1, 0) * page_size + last_page_len`, which is not 0 for
zero pages with last_page_len >= 1, and empty-KV LSE handling has had bugs per backend
(flashinfer PRs #353, #440; issue #4452). Decision: level-0 and level-1 entries are never empty.
Lone decodes do not go through the cascade wrapper at all; they join the plain paged decode
batch (`FlashInferIndex.plain_rows`), and only members of sharing groups go to the cascade
wrapper (`CascadeIndex.rows`). `plan_cascade` caps the shared part so every member keeps at
least one block of its own, which keeps level 1 non-empty; a group that violates it is
rejected with `ValueError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from parrot_actors.cuda.layout import BatchLayout, SeqLayout


@dataclass
class PagedKVIndex:
    """One FlashInfer paged-KV plan in CSR form (see the module docstring).

    qo_indptr: `[batch + 1]` query row offsets. kv_indptr: `[batch + 1]` page offsets.
    kv_indices: `[kv_indptr[-1]]` block ids. kv_last_page_len: `[batch]`, each in
    `[1, page_size]`. All counts are tokens or pages; nothing is in bytes.
    """

    qo_indptr: list[int]
    kv_indptr: list[int]
    kv_indices: list[int]
    kv_last_page_len: list[int]

    @property
    def batch_size(self) -> int:
        """Number of requests (entries) in the plan."""
        return len(self.kv_last_page_len)

    @property
    def num_qo(self) -> int:
        """Query rows the plan covers (`qo_indptr[-1]`)."""
        return self.qo_indptr[-1]


@dataclass
class CascadeIndex:
    """The 2-level cascade plan for the decodes of sharing groups.

    rows: indices into `BatchLayout.decodes` of the decodes served by the cascade wrapper, in
    the order of the cascade call's query rows. shared: level 0 (one entry per group). unique:
    level 1 (one entry per row). `levels` gives them as the lists `MultiLevelCascadeAttention
    Wrapper.plan` takes.
    """

    rows: list[int]
    shared: PagedKVIndex
    unique: PagedKVIndex

    @property
    def levels(self) -> list[PagedKVIndex]:
        """`[shared, unique]`: level 0 then level 1."""
        return [self.shared, self.unique]


@dataclass
class FlashInferIndex:
    """Everything one step needs, split by wrapper.

    prefill: plan for all prefill sequences (query rows `[0, num_prefill_tokens)` of the step),
    or None. plain_rows / plain: decode indices served by plain paged decode and their plan (None
    when empty). cascade: the cascade plan, or None. Decode index d is query row
    `num_prefill_tokens + d` of the step.
    """

    prefill: PagedKVIndex | None
    plain_rows: list[int]
    plain: PagedKVIndex | None
    cascade: CascadeIndex | None


def num_pages(kv_len: int, page_size: int) -> int:
    """Pages needed for `kv_len` tokens: ceil(kv_len / page_size)."""
    return -(-kv_len // page_size)


def last_page_len(kv_len: int, page_size: int) -> int:
    """Tokens in the last page of a `kv_len`-token sequence, in `[1, page_size]` (a full last
    page gives `page_size`, FlashInfer's convention). Raises `ValueError` if `kv_len < 1` or
    `page_size < 1`."""
    if page_size < 1:
        raise ValueError(f"page_size={page_size}: must be >= 1")
    if kv_len < 1:
        raise ValueError(f"kv_len={kv_len}: FlashInfer entries need at least one KV token")
    return (kv_len - 1) % page_size + 1


def _check_seq(seq: SeqLayout, page_size: int, what: str) -> None:
    if seq.query_len < 1 or seq.kv_len < seq.query_len:
        raise ValueError(
            f"{what}: query_len={seq.query_len}, kv_len={seq.kv_len}: need 1 <= query_len <= kv_len"
        )
    want = num_pages(seq.kv_len, page_size)
    if len(seq.block_table) != want:
        raise ValueError(
            f"{what}: block_table has {len(seq.block_table)} blocks, kv_len={seq.kv_len} with "
            f"block_size={page_size} needs exactly {want}"
        )


def paged_kv_index(
    seqs: Sequence[SeqLayout], page_size: int, skip_blocks: Sequence[int] | None = None
) -> PagedKVIndex:
    """CSR plan for `seqs`, one entry each, queries `query_len` rows each in order.

    skip_blocks: per sequence, leading blocks to leave out (a cascade member's shared blocks);
    the entry then covers `kv_len - skip * page_size` tokens. Raises `ValueError` if an entry
    would be empty or a block table does not match its kv_len.
    """
    skips = [0] * len(seqs) if skip_blocks is None else list(skip_blocks)
    if len(skips) != len(seqs):
        raise ValueError(f"skip_blocks has {len(skips)} entries for {len(seqs)} sequences")
    qo_indptr = [0]
    kv_indptr = [0]
    kv_indices: list[int] = []
    last: list[int] = []
    for i, (seq, skip) in enumerate(zip(seqs, skips, strict=True)):
        _check_seq(seq, page_size, f"sequence {i}")
        own = seq.kv_len - skip * page_size
        if skip < 0 or own < 1:
            raise ValueError(
                f"sequence {i}: skipping {skip} blocks of a {seq.kv_len}-token sequence leaves "
                f"{own} tokens; FlashInfer entries must not be empty"
            )
        kv_indices.extend(seq.block_table[skip:])
        kv_indptr.append(len(kv_indices))
        qo_indptr.append(qo_indptr[-1] + seq.query_len)
        last.append(last_page_len(own, page_size))
    return PagedKVIndex(qo_indptr, kv_indptr, kv_indices, last)


def prefill_index(layout: BatchLayout) -> PagedKVIndex | None:
    """Plan for `BatchPrefillWithPagedKVCacheWrapper` over the layout's prefills (None if
    there are none). Raises `ValueError` on a malformed sequence."""
    if not layout.prefills:
        return None
    return paged_kv_index(layout.prefills, layout.block_size)


def decode_index(layout: BatchLayout, rows: Sequence[int]) -> PagedKVIndex:
    """Plain paged-decode plan for `layout.decodes[r]` for r in `rows` (qo_indptr
    `[0, 1, ..., len(rows)]`). Raises `ValueError` if a decode has query_len != 1."""
    seqs = [layout.decodes[r] for r in rows]
    for r, s in zip(rows, seqs, strict=True):
        if s.query_len != 1:
            raise ValueError(f"decode {r}: query_len={s.query_len}, a decode has exactly 1")
    return paged_kv_index(seqs, layout.block_size)


def cascade_index(layout: BatchLayout) -> CascadeIndex | None:
    """2-level cascade plan for the members of groups with `shared_blocks > 0` (None if no
    group shares anything). Lone groups are left to plain decode (module docstring).

    Level 0 reads each group's shared blocks from its first member's block table (a
    `CascadeGroup` promises the members agree on them; not re-checked here, that would cost
    O(members x shared blocks) per step). Raises `ValueError` if a member would keep no block
    of its own or a decode has query_len != 1.
    """
    bs = layout.block_size
    rows: list[int] = []
    skips: list[int] = []
    qo0 = [0]
    kv0 = [0]
    idx0: list[int] = []
    for g in layout.cascade_groups:
        if g.shared_blocks == 0:
            continue
        table = layout.decodes[g.members[0]].block_table
        for m in g.members:
            s = layout.decodes[m]
            if s.query_len != 1:
                raise ValueError(f"decode {m}: query_len={s.query_len}, a decode has exactly 1")
            if len(s.block_table) <= g.shared_blocks:
                raise ValueError(
                    f"cascade group {g.members}: decode {m} has {len(s.block_table)} blocks, "
                    f"all {g.shared_blocks} shared; each member needs >= 1 block of its own"
                )
            rows.append(m)
            skips.append(g.shared_blocks)
        idx0.extend(table[: g.shared_blocks])
        kv0.append(len(idx0))
        qo0.append(len(rows))
    if not rows:
        return None
    shared = PagedKVIndex(qo0, kv0, idx0, [bs] * (len(kv0) - 1))
    unique = paged_kv_index([layout.decodes[r] for r in rows], bs, skips)
    return CascadeIndex(rows, shared, unique)


def plan_indices(layout: BatchLayout) -> FlashInferIndex:
    """Split one step across FlashInfer's wrappers and build every plan.

    Prefills go to the prefill wrapper. Without cascade groups every decode goes to plain paged
    decode. With groups, members of sharing groups go to the cascade wrapper and lone decodes to
    plain paged decode. Raises `ValueError` if the groups do not cover every decode exactly
    once, or on any malformed sequence or group.
    """
    n = len(layout.decodes)
    if layout.cascade_groups:
        seen = sorted(m for g in layout.cascade_groups for m in g.members)
        if seen != list(range(n)):
            raise ValueError(
                f"cascade groups cover decodes {seen}; they must cover each of the {n} decodes "
                "exactly once"
            )
    cascade = cascade_index(layout)
    in_cascade = set(cascade.rows) if cascade else set()
    plain_rows = [d for d in range(n) if d not in in_cascade]
    plain = decode_index(layout, plain_rows) if plain_rows else None
    return FlashInferIndex(prefill_index(layout), plain_rows, plain, cascade)


def as_range(rows: Sequence[int]) -> tuple[int, int] | None:
    """`(start, stop)` if `rows` is exactly `range(start, stop)` (non-empty), else None; lets the
    backend slice instead of gather."""
    if not rows:
        return None
    start = rows[0]
    for i, r in enumerate(rows):
        if r != start + i:
            return None
    return start, start + len(rows)
