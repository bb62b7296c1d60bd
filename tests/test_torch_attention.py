"""The torch backend against dense reference attention, and cascade decode against plain."""

from __future__ import annotations

import math

import pytest
import torch

from parrot_actors.cuda.layout import BatchLayout, SeqLayout, plan_cascade
from parrot_actors.cuda.torch_backend import TorchAttention

H, KVH, D, BS = 8, 2, 16, 4


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int
) -> torch.Tensor:
    """q [n, H, D] at positions q_start.., k/v [L, KVH, D] -> [n, H, D], causal, naive."""
    g = H // KVH
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) / math.sqrt(D)
    pos = torch.arange(q.shape[0])[:, None] + q_start
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > pos, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(scores, -1), v)


def make_cache(num_blocks: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, 2, BS, KVH, D, generator=gen)


def kv_of(cache: torch.Tensor, table: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.cat([cache[b, 0] for b in table])[:n]
    v = torch.cat([cache[b, 1] for b in table])[:n]
    return k, v


def test_prefill_matches_dense():
    cache = make_cache(32, 0)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1)).tolist()
    seqs = (SeqLayout(7, 7, tuple(perm[:2])), SeqLayout(5, 13, tuple(perm[2:6])))
    layout = BatchLayout(BS, prefills=seqs)
    q = torch.randn(12, H, D, generator=torch.Generator().manual_seed(2))
    attn = TorchAttention(H, KVH, D, torch.device("cpu"))
    attn.plan(layout)
    out = attn.forward(q, cache)
    k0, v0 = kv_of(cache, seqs[0].block_table, 7)
    k1, v1 = kv_of(cache, seqs[1].block_table, 13)
    torch.testing.assert_close(out[:7], dense_reference(q[:7], k0, v0, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[7:], dense_reference(q[7:], k1, v1, 8), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group_size,prefix_blocks,seed", [(2, 1, 0), (5, 3, 1), (16, 8, 2)])
def test_cascade_decode_equals_plain(group_size: int, prefix_blocks: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = prefix_blocks + group_size * 3 + 8
    cache = make_cache(num_blocks, seed)
    shared = tuple(range(prefix_blocks))
    nxt = prefix_blocks
    decodes = []
    for i in range(group_size):
        own_len = 1 + (i * 3) % (2 * BS)  # own tokens after the shared prefix: 1 .. 2 blocks
        n_own = -(-own_len // BS)
        decodes.append(
            SeqLayout(1, prefix_blocks * BS + own_len, shared + tuple(range(nxt, nxt + n_own)))
        )
        nxt += n_own
    lone = SeqLayout(1, 6, (nxt, nxt + 1))  # a decode sharing nothing
    decodes.insert(1, lone)
    ordered, groups = plan_cascade(decodes, BS)
    assert any(g.shared_blocks == prefix_blocks and len(g.members) == group_size for g in groups)
    q = torch.randn(len(ordered), H, D, generator=gen)
    attn = TorchAttention(H, KVH, D, torch.device("cpu"))
    attn.plan(BatchLayout(BS, decodes=tuple(ordered), cascade_groups=tuple(groups)))
    cascade = attn.forward(q, cache)
    attn.plan(BatchLayout(BS, decodes=tuple(ordered)))
    plain = attn.forward(q, cache)
    torch.testing.assert_close(cascade, plain, atol=1e-5, rtol=1e-5)
    for i, s in enumerate(ordered):
        k, v = kv_of(cache, s.block_table, s.kv_len)
        ref = dense_reference(q[i : i + 1], k, v, s.kv_len - 1)
        torch.testing.assert_close(plain[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_forward_before_plan_raises():
    attn = TorchAttention(H, KVH, D, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="before plan"):
        attn.forward(torch.zeros(1, H, D), make_cache(2, 0))
