"""CPU tests of the FlashInfer plan indices and of FlashInferAttention's orchestration.

The index tests compare `flashinfer_index` against hand-computed CSR lists (FlashInfer's paged
format: docs.flashinfer.ai, "KV-Cache Layout"; last_page_len in [1, page_size]). The backend
tests run `FlashInferAttention` against a stand-in `flashinfer` module written here in torch,
which implements the documented semantics of the three wrappers and asserts the invariants the
real kernels rely on (int32 host tensors, no empty entries, q rows == qo_indptr[-1]); its output
is compared with the torch reference backend.
"""

from __future__ import annotations

import importlib
import math
import random
import sys
import types

import pytest
import torch

from parrot_actors.cuda import flashinfer_available
from parrot_actors.cuda.flashinfer_index import (
    CascadeIndex,
    PagedKVIndex,
    as_range,
    cascade_index,
    last_page_len,
    num_pages,
    paged_kv_index,
    plan_indices,
    prefill_index,
)
from parrot_actors.cuda.layout import BatchLayout, CascadeGroup, SeqLayout, plan_cascade
from parrot_actors.cuda.torch_backend import TorchAttention
from parrot_actors.errors import EngineError

PS = 4  # page (block) size of the hand-computed cases


# --- last page length -------------------------------------------------------------------------


def test_last_page_len_is_in_one_to_page_size() -> None:
    assert [last_page_len(n, 4) for n in range(1, 10)] == [1, 2, 3, 4, 1, 2, 3, 4, 1]
    assert last_page_len(16, 16) == 16
    assert last_page_len(17, 16) == 1
    assert [num_pages(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


def test_last_page_len_rejects_empty() -> None:
    with pytest.raises(ValueError, match="kv_len=0"):
        last_page_len(0, 4)
    with pytest.raises(ValueError, match="page_size=0"):
        last_page_len(3, 0)


# --- prefill ----------------------------------------------------------------------------------


def test_prefill_two_sequences_partial_last_pages() -> None:
    # A: fresh 5-token prompt in blocks 7, 3 (last page holds 1 token).
    # B: 3 new tokens extending a 7-token context: kv_len 10 in blocks 1, 8, 6 (last page 2).
    a = SeqLayout(query_len=5, kv_len=5, block_table=(7, 3))
    b = SeqLayout(query_len=3, kv_len=10, block_table=(1, 8, 6))
    got = prefill_index(BatchLayout(PS, prefills=(a, b)))
    assert got == PagedKVIndex(
        qo_indptr=[0, 5, 8],
        kv_indptr=[0, 2, 5],
        kv_indices=[7, 3, 1, 8, 6],
        kv_last_page_len=[1, 2],
    )
    assert got.batch_size == 2 and got.num_qo == 8


def test_prefill_ending_on_page_boundary_counts_full_page() -> None:
    s = SeqLayout(query_len=8, kv_len=8, block_table=(2, 5))
    got = prefill_index(BatchLayout(PS, prefills=(s,)))
    assert got == PagedKVIndex([0, 8], [0, 2], [2, 5], [4])


def test_prefill_none_without_prefills() -> None:
    assert prefill_index(BatchLayout(PS)) is None


def test_block_table_must_match_kv_len() -> None:
    bad = SeqLayout(query_len=2, kv_len=5, block_table=(1,))
    with pytest.raises(ValueError, match="needs exactly 2"):
        prefill_index(BatchLayout(PS, prefills=(bad,)))
    with pytest.raises(ValueError, match="query_len=0"):
        prefill_index(BatchLayout(PS, prefills=(SeqLayout(0, 3, (1,)),)))


# --- plain decode -----------------------------------------------------------------------------


def test_plain_decode() -> None:
    d = (
        SeqLayout(1, 6, (4, 9)),  # last page 2
        SeqLayout(1, 4, (0,)),  # full page
        SeqLayout(1, 1, (5,)),  # first token
    )
    got = plan_indices(BatchLayout(PS, decodes=d))
    assert got.prefill is None and got.cascade is None
    assert got.plain_rows == [0, 1, 2]
    assert got.plain == PagedKVIndex([0, 1, 2, 3], [0, 2, 3, 4], [4, 9, 0, 5], [2, 4, 1])


def test_decode_must_have_one_query() -> None:
    with pytest.raises(ValueError, match="query_len=2"):
        plan_indices(BatchLayout(PS, decodes=(SeqLayout(2, 6, (4, 9)),)))


# --- cascade ----------------------------------------------------------------------------------


def _forked_pair_and_lone() -> BatchLayout:
    # Parent: 12 tokens in full blocks 10, 11, 12. c0 adds 2 tokens (block 20), c1 adds 1
    # (block 21). L is a lone 6-token decode in blocks 30, 31.
    c0 = SeqLayout(1, 14, (10, 11, 12, 20))
    c1 = SeqLayout(1, 13, (10, 11, 12, 21))
    lone = SeqLayout(1, 6, (30, 31))
    return BatchLayout(
        PS,
        decodes=(c0, c1, lone),
        cascade_groups=(CascadeGroup((0, 1), 3), CascadeGroup((2,), 0)),
    )


def test_cascade_group_plus_lone_decode() -> None:
    got = plan_indices(_forked_pair_and_lone())
    assert got.cascade == CascadeIndex(
        rows=[0, 1],
        shared=PagedKVIndex([0, 2], [0, 3], [10, 11, 12], [4]),
        unique=PagedKVIndex([0, 1, 2], [0, 1, 2], [20, 21], [2, 1]),
    )
    # The lone decode never gets an empty level-0 entry: it goes to plain paged decode.
    assert got.plain_rows == [2]
    assert got.plain == PagedKVIndex([0, 1], [0, 2], [30, 31], [2])
    assert got.cascade.levels == [got.cascade.shared, got.cascade.unique]


def test_cascade_two_groups_level0_per_group() -> None:
    g0 = (SeqLayout(1, 9, (1, 2, 3)), SeqLayout(1, 10, (1, 2, 4)))
    g1 = (SeqLayout(1, 5, (7, 8)), SeqLayout(1, 6, (7, 9)), SeqLayout(1, 8, (7, 5)))
    layout = BatchLayout(
        PS,
        decodes=g0 + g1,
        cascade_groups=(CascadeGroup((0, 1), 2), CascadeGroup((2, 3, 4), 1)),
    )
    got = cascade_index(layout)
    assert got.rows == [0, 1, 2, 3, 4]
    assert got.shared == PagedKVIndex([0, 2, 5], [0, 2, 3], [1, 2, 7], [4, 4])
    assert got.unique == PagedKVIndex(
        [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [3, 4, 8, 9, 5], [1, 2, 1, 2, 4]
    )
    assert plan_indices(layout).plain is None


def test_cascade_member_without_own_block_is_rejected() -> None:
    layout = BatchLayout(
        PS,
        decodes=(SeqLayout(1, 8, (1, 2)), SeqLayout(1, 9, (1, 2, 3))),
        cascade_groups=(CascadeGroup((0, 1), 2),),
    )
    with pytest.raises(ValueError, match="needs >= 1 block of its own"):
        plan_indices(layout)


def test_cascade_groups_must_cover_every_decode() -> None:
    layout = BatchLayout(
        PS,
        decodes=(SeqLayout(1, 5, (1, 2)), SeqLayout(1, 6, (1, 3)), SeqLayout(1, 2, (4,))),
        cascade_groups=(CascadeGroup((0, 1), 1),),
    )
    with pytest.raises(ValueError, match=r"cover decodes \[0, 1\]"):
        plan_indices(layout)


def test_as_range() -> None:
    assert as_range([2, 3, 4]) == (2, 5)
    assert as_range([0]) == (0, 1)
    assert as_range([0, 2]) is None
    assert as_range([]) is None


def test_paged_kv_index_refuses_empty_entry() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        paged_kv_index([SeqLayout(1, 8, (1, 2))], PS, skip_blocks=[2])


# --- plan_cascade (layout.py) -----------------------------------------------------------------


def test_plan_cascade_groups_by_first_block() -> None:
    x0 = SeqLayout(1, 10, (1, 2, 3))
    y = SeqLayout(1, 7, (7, 8))
    x1 = SeqLayout(1, 12, (1, 2, 4))
    z = SeqLayout(1, 3, (9,))
    ordered, groups = plan_cascade([x0, y, x1, z], PS)
    assert ordered == [x0, x1, y, z]
    assert groups == [
        CascadeGroup((0, 1), 2),
        CascadeGroup((2,), 0),
        CascadeGroup((3,), 0),
    ]
    idx = plan_indices(BatchLayout(PS, decodes=tuple(ordered), cascade_groups=tuple(groups)))
    assert idx.cascade.rows == [0, 1]
    assert idx.cascade.shared == PagedKVIndex([0, 2], [0, 2], [1, 2], [4])
    assert idx.cascade.unique == PagedKVIndex([0, 1, 2], [0, 1, 2], [3, 4], [2, 4])
    assert idx.plain_rows == [2, 3]
    assert idx.plain == PagedKVIndex([0, 1, 2], [0, 2, 3], [7, 8, 9], [3, 3])


def test_plan_cascade_caps_shared_to_leave_an_own_block() -> None:
    # Common prefix is 2 blocks, but the first member has only 2: cap at 1.
    a = SeqLayout(1, 8, (1, 2))
    b = SeqLayout(1, 9, (1, 2, 5))
    ordered, groups = plan_cascade([a, b], PS)
    assert ordered == [a, b]
    assert groups == [CascadeGroup((0, 1), 1)]
    casc = cascade_index(BatchLayout(PS, decodes=tuple(ordered), cascade_groups=tuple(groups)))
    assert casc.shared == PagedKVIndex([0, 2], [0, 1], [1], [4])
    assert casc.unique == PagedKVIndex([0, 1, 2], [0, 1, 3], [2, 2, 5], [4, 1])


def test_plan_cascade_without_sharing_returns_no_groups() -> None:
    a = SeqLayout(1, 5, (1, 2))
    b = SeqLayout(1, 5, (3, 4))
    assert plan_cascade([a, b], PS) == ([a, b], [])
    # Sharing 2 blocks but min_shared_blocks=3: all lone, so no groups at all.
    c = SeqLayout(1, 9, (1, 2, 6))
    d = SeqLayout(1, 10, (1, 2, 7))
    assert plan_cascade([c, d], PS, min_shared_blocks=3) == ([c, d], [])


# --- FlashInferAttention without flashinfer ---------------------------------------------------


def test_backend_module_imports_without_flashinfer() -> None:
    mod = importlib.import_module("parrot_actors.cuda.flashinfer_backend")
    assert hasattr(mod, "FlashInferAttention")


@pytest.mark.skipif(flashinfer_available(), reason="flashinfer is installed here")
def test_constructing_without_flashinfer_raises_engine_error() -> None:
    from parrot_actors.cuda.backend import make_backend
    from parrot_actors.cuda.flashinfer_backend import FlashInferAttention

    with pytest.raises(EngineError, match="flashinfer-python"):
        FlashInferAttention(8, 2, 64, torch.device("cuda"), torch.bfloat16)
    with pytest.raises(EngineError, match="flashinfer-python"):
        make_backend(
            "flashinfer",
            num_heads=8,
            num_kv_heads=2,
            head_dim=64,
            device=torch.device("cuda"),
            dtype=torch.bfloat16,
        )


# --- A torch stand-in for the flashinfer module -----------------------------------------------


def _check_csr(qo, kv_indptr, kv_indices, last, page_size: int) -> tuple[list[int], ...]:
    """Assert the invariants real FlashInfer plans need; return the lists."""
    for t in (qo, kv_indptr, kv_indices, last):
        assert t.dtype == torch.int32 and t.device.type == "cpu" and t.dim() == 1
    qo_l, kvp, idx, lp = qo.tolist(), kv_indptr.tolist(), kv_indices.tolist(), last.tolist()
    assert len(qo_l) == len(kvp) == len(lp) + 1
    assert qo_l[0] == 0 and kvp[0] == 0 and kvp[-1] == len(idx)
    for i in range(len(lp)):
        assert kvp[i + 1] > kvp[i], "empty KV entry"
        assert qo_l[i + 1] > qo_l[i], "entry without queries"
        assert 1 <= lp[i] <= page_size, "last_page_len outside [1, page_size]"
    return qo_l, kvp, idx, lp


class _FakePlan:
    """Paged attention by the CSR rules of FlashInfer, in float32 torch."""

    def set(self, qo, kv_indptr, kv_indices, last, hq, hkv, d, page_size, causal, kw) -> None:
        self.qo, self.kvp, self.idx, self.last = _check_csr(
            qo, kv_indptr, kv_indices, last, page_size
        )
        self.hq, self.hkv, self.d, self.page_size, self.causal = hq, hkv, d, page_size, causal
        self.scale = kw["sm_scale"]
        assert math.isclose(self.scale, 1 / math.sqrt(d))
        self.q_dtype, self.kv_dtype = kw["q_data_type"], kw["kv_data_type"]

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert q.shape == (self.qo[-1], self.hq, self.d) and q.dtype == self.q_dtype
        assert kv_cache.dtype == self.kv_dtype and kv_cache.shape[2] == self.page_size
        out = torch.empty(q.shape, dtype=torch.float32)
        lse = torch.empty(q.shape[:2], dtype=torch.float32)
        g = self.hq // self.hkv
        for i in range(len(self.last)):
            pages = self.idx[self.kvp[i] : self.kvp[i + 1]]
            n = (len(pages) - 1) * self.page_size + self.last[i]
            k = kv_cache[pages, 0].reshape(-1, self.hkv, self.d)[:n].float()
            v = kv_cache[pages, 1].reshape(-1, self.hkv, self.d)[:n].float()
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            qs = q[self.qo[i] : self.qo[i + 1]].float()
            s = torch.einsum("qhd,khd->hqk", qs, k) * self.scale
            if self.causal:
                lq = qs.shape[0]
                keep = torch.arange(n)[None, :] <= (n - lq + torch.arange(lq))[:, None]
                s = s.masked_fill(~keep, float("-inf"))
            lse_i = torch.logsumexp(s, dim=-1)  # [h, q]
            o = torch.einsum("hqk,khd->qhd", torch.exp(s - lse_i[..., None]), v)
            out[self.qo[i] : self.qo[i + 1]] = o
            lse[self.qo[i] : self.qo[i + 1]] = lse_i.T
        return out, lse


class _FakePrefill:
    def __init__(self, workspace: torch.Tensor, kv_layout: str = "NHD") -> None:
        assert kv_layout == "NHD" and workspace.dtype == torch.uint8
        self.p = _FakePlan()
        self.calls = 0

    def plan(self, qo, kv_indptr, kv_indices, last, hq, hkv, d, page_size, *, causal=False, **kw):
        self.p.set(qo, kv_indptr, kv_indices, last, hq, hkv, d, page_size, causal, kw)

    def run(self, q, kv_cache, *, out=None, return_lse=False):
        self.calls += 1
        o, lse = self.p.run(q, kv_cache)
        if out is not None:
            assert out.shape == q.shape and out.is_contiguous()
            out.copy_(o)
        o = out if out is not None else o.to(q.dtype)
        return (o, lse) if return_lse else o


class _FakeDecode(_FakePrefill):
    def __init__(self, workspace, kv_layout="NHD", use_tensor_cores=False) -> None:
        super().__init__(workspace, kv_layout)
        self.use_tensor_cores = use_tensor_cores

    def plan(self, kv_indptr, kv_indices, last, hq, hkv, d, page_size, **kw):  # type: ignore[override]
        qo = torch.arange(len(last) + 1, dtype=torch.int32)
        self.p.set(qo, kv_indptr, kv_indices, last, hq, hkv, d, page_size, False, kw)


class _FakeCascade:
    def __init__(self, num_levels, workspace, kv_layout="NHD") -> None:
        self.levels = [_FakePrefill(workspace, kv_layout) for _ in range(num_levels)]
        self.calls = 0

    def plan(
        self, qo_arr, kvp_arr, idx_arr, last_arr, hq, hkv, d, page_size, *, causal=False, **kw
    ):
        for i, w in enumerate(self.levels):
            w.plan(
                qo_arr[i],
                kvp_arr[i],
                idx_arr[i],
                last_arr[i],
                hq,
                hkv,
                d,
                page_size,
                causal=causal if i == len(self.levels) - 1 else False,
                **kw,
            )
        num_q = {w.p.qo[-1] for w in self.levels}
        assert len(num_q) == 1, "every level must cover every query"

    def run(self, q, kv_cache):
        self.calls += 1
        out, lse = self.levels[-1].p.run(q, kv_cache)
        for w in self.levels[:-1]:
            o2, lse2 = w.p.run(q, kv_cache)
            m = torch.maximum(lse, lse2)
            w1, w2 = torch.exp(lse - m)[..., None], torch.exp(lse2 - m)[..., None]
            out = (out * w1 + o2 * w2) / (w1 + w2)
            lse = m + torch.log(w1 + w2)[..., 0]
        return out.to(q.dtype)


@pytest.fixture
def fake_flashinfer(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Install the torch stand-in as `flashinfer` and let the backend run on the CPU."""
    import parrot_actors.cuda.flashinfer_backend as fb

    mod = types.ModuleType("flashinfer")
    mod.BatchPrefillWithPagedKVCacheWrapper = _FakePrefill
    mod.BatchDecodeWithPagedKVCacheWrapper = _FakeDecode
    mod.MultiLevelCascadeAttentionWrapper = _FakeCascade
    monkeypatch.setitem(sys.modules, "flashinfer", mod)
    monkeypatch.setattr(fb, "_check_device", lambda device: None)
    return mod


def test_backend_rejects_bad_device_dtype_head_dim(monkeypatch: pytest.MonkeyPatch) -> None:
    from parrot_actors.cuda.flashinfer_backend import FlashInferAttention

    monkeypatch.setitem(sys.modules, "flashinfer", types.ModuleType("flashinfer"))
    with pytest.raises(EngineError, match="CUDA devices only, got device='cpu'"):
        FlashInferAttention(8, 2, 64, torch.device("cpu"), torch.bfloat16)
    import parrot_actors.cuda.flashinfer_backend as fb

    monkeypatch.setattr(fb, "_check_device", lambda device: None)
    with pytest.raises(EngineError, match="float16 or bfloat16, got torch.float32"):
        FlashInferAttention(8, 2, 64, torch.device("cpu"), torch.float32)
    with pytest.raises(EngineError, match="head_dim=32 is not supported"):
        FlashInferAttention(8, 2, 32, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(EngineError, match="multiple of num_kv_heads=3"):
        FlashInferAttention(8, 3, 64, torch.device("cpu"), torch.bfloat16)


def test_use_tensor_cores_heuristic() -> None:
    from parrot_actors.cuda.flashinfer_backend import use_tensor_cores

    assert [use_tensor_cores(h, 1) for h in (1, 2, 3, 4, 5, 6, 8, 16)] == [
        False,
        False,
        False,
        True,
        True,
        True,
        True,
        True,
    ]
    assert use_tensor_cores(32, 32) is False and use_tensor_cores(32, 8) is True


def _mixed_layout(rng: random.Random, bs: int, decode_order: str) -> BatchLayout:
    """Two prefills (one extending a context) and decodes: two forked groups plus lone ones,
    in an order that makes plain rows (`"lone_split"`) or cascade rows (`"group_split"`)
    non-contiguous."""
    ids = list(range(64))
    rng.shuffle(ids)
    take = iter(ids)

    def seq(q: int, kv: int, prefix: tuple[int, ...] = ()) -> SeqLayout:
        need = -(-kv // bs) - len(prefix)
        return SeqLayout(q, kv, prefix + tuple(next(take) for _ in range(need)))

    prefills = (seq(5, 5), seq(3, 11))
    pa = tuple(next(take) for _ in range(3))  # 3 shared blocks
    pb = tuple(next(take) for _ in range(2))  # 2 shared blocks
    a = [seq(1, 3 * bs + k, pa) for k in (1, 3)]
    b = [seq(1, 2 * bs + k, pb) for k in (2, 4, 1)]
    lone = [seq(1, 7), seq(1, 2)]
    if decode_order == "lone_split":
        decodes = [lone[0], *a, lone[1], *b]
    else:
        decodes = [*a, lone[0], lone[1], *b]
    ordered, groups = plan_cascade(decodes, bs)
    return BatchLayout(bs, prefills, tuple(ordered), tuple(groups))


@pytest.mark.parametrize("decode_order", ["lone_split", "group_split"])
@pytest.mark.parametrize("heads", [(4, 2, 64), (3, 3, 64)])
def test_backend_matches_torch_reference_with_fake_flashinfer(
    fake_flashinfer: types.ModuleType, decode_order: str, heads: tuple[int, int, int]
) -> None:
    from parrot_actors.cuda.flashinfer_backend import FlashInferAttention

    hq, hkv, d = heads
    bs = 4
    layout = _mixed_layout(random.Random(7), bs, decode_order)
    torch.manual_seed(0)
    kv = torch.randn(64, 2, bs, hkv, d).to(torch.bfloat16)
    q = torch.randn(layout.num_tokens, hq, d).to(torch.bfloat16)
    fi = FlashInferAttention(hq, hkv, d, torch.device("cpu"), torch.bfloat16, workspace_bytes=64)
    fi.plan(layout)
    idx = fi.index
    if decode_order == "lone_split":
        assert idx.plain_rows == [0, 3] and idx.cascade.rows == [1, 2, 4, 5, 6]
    else:
        assert idx.plain_rows == [2, 3] and idx.cascade.rows == [0, 1, 4, 5, 6]
    got = fi.forward(q, kv)
    ref = TorchAttention(hq, hkv, d, torch.device("cpu"))
    ref.plan(layout)
    want = ref.forward(q, kv)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert fi._prefill.calls == 1 and fi._decode.calls == 1 and fi._cascade.calls == 1


def test_backend_plain_decode_only_and_replan(fake_flashinfer: types.ModuleType) -> None:
    from parrot_actors.cuda.flashinfer_backend import FlashInferAttention

    bs, hq, hkv, d = 4, 4, 1, 64
    torch.manual_seed(1)
    kv = torch.randn(16, 2, bs, hkv, d).to(torch.float16)
    fi = FlashInferAttention(hq, hkv, d, torch.device("cpu"), torch.float16, workspace_bytes=64)
    assert fi._decode.use_tensor_cores is True
    ref = TorchAttention(hq, hkv, d, torch.device("cpu"))
    layouts = [
        BatchLayout(bs, decodes=(SeqLayout(1, 6, (4, 9)), SeqLayout(1, 4, (0,)))),
        BatchLayout(bs, prefills=(SeqLayout(4, 4, (3,)),)),
    ]
    for layout in layouts:
        q = torch.randn(layout.num_tokens, hq, d).to(torch.float16)
        fi.plan(layout)
        ref.plan(layout)
        torch.testing.assert_close(
            fi.forward(q, kv).float(), ref.forward(q, kv).float(), atol=2e-2, rtol=2e-2
        )
    assert fi._cascade.calls == 0 and fi._decode.calls == 1 and fi._prefill.calls == 1


def test_backend_forward_checks(fake_flashinfer: types.ModuleType) -> None:
    from parrot_actors.cuda.flashinfer_backend import FlashInferAttention

    fi = FlashInferAttention(4, 2, 64, torch.device("cpu"), torch.bfloat16, workspace_bytes=64)
    kv = torch.zeros(8, 2, 4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="before plan"):
        fi.forward(torch.zeros(1, 4, 64, dtype=torch.bfloat16), kv)
    fi.plan(BatchLayout(4, decodes=(SeqLayout(1, 3, (2,)),)))
    with pytest.raises(ValueError, match=r"the plan needs \(1, 4, 64\)"):
        fi.forward(torch.zeros(2, 4, 64, dtype=torch.bfloat16), kv)
    with pytest.raises(ValueError, match="kv_cache is"):
        fi.forward(torch.zeros(1, 4, 64, dtype=torch.bfloat16), kv[:, :, :2])


def test_failed_plan_blocks_forward(fake_flashinfer: types.ModuleType) -> None:
    from parrot_actors.cuda.flashinfer_backend import FlashInferAttention

    fi = FlashInferAttention(4, 2, 64, torch.device("cpu"), torch.bfloat16, workspace_bytes=64)
    fi.plan(BatchLayout(4, decodes=(SeqLayout(1, 3, (2,)),)))
    with pytest.raises(ValueError, match="needs exactly 1"):
        fi.plan(BatchLayout(4, decodes=(SeqLayout(1, 3, (2, 5)),)))
    assert fi.index is None
    with pytest.raises(RuntimeError, match="before plan"):
        fi.forward(torch.zeros(1, 4, 64, dtype=torch.bfloat16), torch.zeros(8, 2, 4, 2, 64))
