"""Pure-torch paged attention: the CPU backend and the correctness oracle for FlashInfer.

Prefill sequences attend causally to their whole context (one SDPA call per sequence). Decode
sequences are batched: each gathers its KV from the block table into a padded
`[batch, max_len, num_kv_heads, head_dim]` tensor. When the layout has cascade groups, a group's
shared prefix is gathered once and attended by all members' queries in one matmul, then merged
with each member's own suffix by log-sum-exp: the math of FlashInfer's cascade attention
(MultiLevelCascadeAttentionWrapper; "Cascade Inference", FlashInfer blog, 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parrot_actors.cuda.layout import BatchLayout, SeqLayout


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention returning its log-sum-exp, for merging partial results.

    q: `[rows, num_kv_heads, q_per_kv, head_dim]`; k, v: `[rows, kv_len, num_kv_heads,
    head_dim]`; valid: `[rows, kv_len]` bool. Returns (out `[rows, num_kv_heads, q_per_kv,
    head_dim]`, lse `[rows, num_kv_heads, q_per_kv]`, natural log). Every row needs at least one
    valid position.
    """
    scores = torch.einsum("nkgd,nlkd->nkgl", q.float(), k.float()) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("nkgl,nlkd->nkgd", probs, v.float())
    return out, lse


def merge_by_lse(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> torch.Tensor:
    """Combine two attention results over disjoint KV sets into the result over their union.

    o: `[..., head_dim]`, lse: `[...]`. Source: FlashInfer `merge_state` (cascade docs).
    """
    m = torch.maximum(lse1, lse2)
    w1 = torch.exp(lse1 - m)[..., None]
    w2 = torch.exp(lse2 - m)[..., None]
    return (o1 * w1 + o2 * w2) / (w1 + w2)


@dataclass
class _SharedPart:
    """A cascade group's shared KV positions and the decode rows that read them."""

    rows: torch.Tensor  # [group_size] indices into the step's decodes
    blocks: torch.Tensor  # [1, shared_blocks] block ids
    valid: torch.Tensor  # [1, shared_blocks * block_size], all True


class TorchAttention:
    """Paged attention in plain torch (any device, any float dtype; math in float32).

    With `decode_kernel=True` (CPU, float32, `cpu_kernels.load_kernels()` done), a step's
    decodes without a shared prefix run `cpu_kernels.paged_decode_attention`, which reads the
    blocks in place instead of gathering them (cascade groups keep the torch path). See
    `AttentionBackend` for the contract. Raises `RuntimeError` if `forward` runs before `plan`.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        decode_kernel: bool = False,
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = device
        self.decode_kernel = decode_kernel
        self.scale = 1.0 / math.sqrt(head_dim)
        self._layout: BatchLayout | None = None

    def plan(self, layout: BatchLayout) -> None:
        """Precompute gather indices and masks for every layer of this step."""
        bs = layout.block_size
        dev = self.device
        self._layout = layout
        # (first token, end token, block ids [1, blocks], kv_len, causal mask [q_len, kv_len]
        # or None for a whole prompt, SDPA's own causal case)
        self._prefill: list[tuple[int, int, torch.Tensor, int, torch.Tensor | None]] = []
        start = 0
        for s in layout.prefills:
            blocks = host_ints([list(s.block_table)], dev)
            causal = None
            if s.query_len != s.kv_len:
                q_pos = torch.arange(s.kv_len - s.query_len, s.kv_len, device=dev)
                causal = torch.arange(s.kv_len, device=dev)[None, :] <= q_pos[:, None]
            self._prefill.append((start, start + s.query_len, blocks, s.kv_len, causal))
            start += s.query_len
        self._decode_start = start
        decodes = layout.decodes
        shared_blocks = [0] * len(decodes)
        self._shared: list[_SharedPart] = []
        for g in layout.cascade_groups:
            if g.shared_blocks == 0:
                continue
            table = decodes[g.members[0]].block_table[: g.shared_blocks]
            rows = host_ints(list(g.members), dev)
            blocks = host_ints([list(table)], dev)
            valid = torch.ones(1, g.shared_blocks * bs, dtype=torch.bool, device=dev)
            self._shared.append(_SharedPart(rows, blocks, valid))
            for m in g.members:
                shared_blocks[m] = g.shared_blocks
        self._decode = None
        if decodes:
            own = [s.block_table[shared_blocks[i] :] for i, s in enumerate(decodes)]
            lens = [s.kv_len - shared_blocks[i] * bs for i, s in enumerate(decodes)]
            max_blocks = max(len(t) for t in own)
            blocks = host_ints([list(t) + [0] * (max_blocks - len(t)) for t in own], dev)
            kv_lens = host_ints(lens, dev)  # [batch]
            # No mask (None) when the decode kernel runs this step: it reads kv_lens.
            mask: torch.Tensor | None = None
            if not self.decode_kernel or self._shared:
                mask = torch.arange(max_blocks * bs, device=dev)[None, :] < kv_lens[:, None]
            self._decode = (blocks, mask, kv_lens)

    def kernel_decode(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """For a planned step of decodes only that the decode kernel runs (no prefill, no
        shared prefix): its block tables (int64 `[batch, max_blocks]`), KV lengths (int64
        `[batch]`, tokens) and softmax scale, so that a caller can run whole layers in one
        kernel call (`cpu_kernels.decoder_layer`); otherwise None. Raises `RuntimeError`
        before `plan`."""
        if self._layout is None:
            raise RuntimeError("TorchAttention.kernel_decode called before plan()")
        if self._prefill or self._decode is None or self._decode[1] is not None:
            return None
        blocks, _, kv_lens = self._decode
        return blocks, kv_lens, self.scale

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """q `[num_tokens, num_heads, head_dim]` -> out, same shape and dtype."""
        if self._layout is None:
            raise RuntimeError("TorchAttention.forward called before plan()")
        out = torch.empty_like(q)
        for start, end, blocks, kv_len, causal in self._prefill:
            out[start:end] = self._prefill_one(q[start:end], kv_cache, blocks, kv_len, causal)
        if self._decode is not None:
            qd = q[self._decode_start :]
            out[self._decode_start :] = self._decode_all(qd, kv_cache).to(q.dtype)
        return out

    def _prefill_one(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        blocks: torch.Tensor,
        kv_len: int,
        causal: torch.Tensor | None,
    ) -> torch.Tensor:
        k, v = gather_blocks(kv_cache, blocks)  # [1, blocks * block_size, kvh, head_dim]
        k, v = k[0, :kv_len], v[0, :kv_len]  # [kv_len, num_kv_heads, head_dim]
        # A whole prompt (no earlier KV) is SDPA's own causal case, whose kernel skips the
        # masked half; with earlier KV (a chunk, a cached prefix) the mask is bottom-right.
        whole = causal is None
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, num_heads, q_len, head_dim]
            k.transpose(0, 1)[None],  # [1, num_kv_heads, kv_len, head_dim]
            v.transpose(0, 1)[None],
            attn_mask=None if whole else causal,  # [q_len, kv_len]
            is_causal=whole,
            scale=self.scale,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)  # [q_len, num_heads, head_dim]

    def _decode_all(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        n, kvh, hd = q.shape[0], self.num_kv_heads, self.head_dim
        g = self.num_heads // kvh
        assert self._decode is not None, "plan() set the decode batch"
        blocks, valid, kv_lens = self._decode
        if valid is None:  # plan() chose the decode kernel for this step
            from parrot_actors.engines.cpu_kernels import paged_decode_attention

            return paged_decode_attention(q, kv_cache, blocks, kv_lens, self.scale)
        k, v = gather_blocks(kv_cache, blocks)  # [batch, max_len, num_kv_heads, head_dim] each
        if not self._shared:
            # No shared prefix: one fused SDPA call, no log-sum-exp needed.
            out = F.scaled_dot_product_attention(
                q[:, :, None, :],  # [batch, num_heads, 1, head_dim]
                k.transpose(1, 2),  # [batch, num_kv_heads, max_len, head_dim]
                v.transpose(1, 2),
                attn_mask=valid[:, None, None, :],  # [batch, 1, 1, max_len]
                scale=self.scale,
                enable_gqa=True,
            )
            return out[:, :, 0, :]  # [batch, num_heads, head_dim]
        qg = q.view(n, kvh, g, hd)  # [batch, num_kv_heads, q_per_kv, head_dim]
        out, lse = attend_with_lse(qg, k, v, valid, self.scale)
        for part in self._shared:
            rows = part.rows
            size = rows.numel()
            # All members' queries against the shared KV in one matmul: [1, kvh, size*g, D].
            qs = qg[rows].permute(1, 0, 2, 3).reshape(1, kvh, size * g, hd)
            ks, vs = gather_blocks(kv_cache, part.blocks)  # [1, shared_len, kvh, head_dim]
            o_s, lse_s = attend_with_lse(qs, ks, vs, part.valid, self.scale)
            o_s = o_s.view(kvh, size, g, hd).permute(1, 0, 2, 3)
            lse_s = lse_s.view(kvh, size, g).permute(1, 0, 2)
            out[rows] = merge_by_lse(out[rows], lse[rows], o_s, lse_s)
        return out.reshape(n, self.num_heads, hd)


def gather_blocks(
    kv_cache: torch.Tensor, blocks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of whole blocks, concatenated per row.

    kv_cache: `[num_blocks, 2, block_size, num_kv_heads, head_dim]`; blocks: `[rows,
    max_blocks]` block ids. Returns k, v: `[rows, max_blocks * block_size, num_kv_heads,
    head_dim]` (whole blocks are copied, which is much faster than gathering token by token).
    """
    rows, nb = blocks.shape
    _, _, bs, kvh, hd = kv_cache.shape
    kv = kv_cache.index_select(0, blocks.reshape(-1)).view(rows, nb, 2, bs, kvh, hd)
    k = kv[:, :, 0].reshape(rows, nb * bs, kvh, hd)
    v = kv[:, :, 1].reshape(rows, nb * bs, kvh, hd)
    return k, v


def write_kv_flat(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_slots: torch.Tensor
) -> None:
    """Store the step's new K/V in a layer's cache with one `index_copy_`.

    kv_cache: `[num_blocks, 2, block_size, num_kv_heads, head_dim]`; k, v: `[num_tokens,
    num_kv_heads, head_dim]`. kv_slots: `[2 * num_tokens]` rows of `kv_cache.view(-1,
    num_kv_heads, head_dim)`: each token's K row, `(block * 2) * block_size + offset`, then
    each token's V row, `block_size` later (`kv_slot_rows`).
    """
    flat = kv_cache.view(-1, kv_cache.shape[3], kv_cache.shape[4])
    flat.index_copy_(0, kv_slots, torch.cat([k, v]).to(kv_cache.dtype))


def host_ints(values: list[int] | list[list[int]], device: torch.device) -> torch.Tensor:
    """int64 tensor of `values` on `device`. On CUDA built in pinned host memory and copied
    without blocking, so a step's small index tensors do not each wait for the GPU (PyTorch's
    caching host allocator keeps the pinned buffer until the copy is done)."""
    t = torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def kv_slot_rows(layout: BatchLayout, device: torch.device) -> torch.Tensor:
    """`[2 * num_tokens]` rows of the flat cache for the step's new K then V (`write_kv_flat`)."""
    blocks, offsets = slot_mapping(layout)
    bs = layout.block_size
    k_rows = [b * 2 * bs + o for b, o in zip(blocks, offsets)]
    return host_ints(k_rows + [r + bs for r in k_rows], device)


def slot_mapping(layout: BatchLayout) -> tuple[list[int], list[int]]:
    """Block id and in-block offset for each new token of the step, in token order."""
    blocks: list[int] = []
    offsets: list[int] = []
    bs = layout.block_size
    seq: SeqLayout
    for seq in layout.sequences():
        for pos in range(seq.kv_len - seq.query_len, seq.kv_len):
            blocks.append(seq.block_table[pos // bs])
            offsets.append(pos % bs)
    return blocks, offsets
