"""FlashInfer attention backend: paged prefill, paged decode and 2-level cascade decode on CUDA.

`flashinfer` is imported lazily in `FlashInferAttention.__init__`, so this module (and the
package) imports where FlashInfer is not installed. Targets the flashinfer-python 0.6.x API
(checked against 0.6.18.post1): the wrappers' `plan()` take the index tensors, the head counts,
head_dim and page_size positionally and everything else by keyword (`causal`, `sm_scale`,
`q_data_type`, `kv_data_type`); `run(q, paged_kv_cache, out=...)`. Sources: docs.flashinfer.ai
(`BatchPrefillWithPagedKVCacheWrapper`, `BatchDecodeWithPagedKVCacheWrapper`,
`MultiLevelCascadeAttentionWrapper`) and flashinfer/cascade.py.

Per step, `plan` turns the layout into CSR index lists (`flashinfer_index.plan_indices`, which
documents the split and the zero-length-entry decision) and calls each needed wrapper's
`plan()` once; every layer's `forward` then only launches kernels:

- prefill tokens (rows `[0, P)`): `BatchPrefillWithPagedKVCacheWrapper`, causal;
- decodes not in a sharing cascade group: `BatchDecodeWithPagedKVCacheWrapper`;
- decodes in sharing groups: `MultiLevelCascadeAttentionWrapper` (level 0 = shared prefix,
  read once per group; level 1 = each member's own blocks; merged by log-sum-exp).

The index lists are passed as host (CPU, pinned) int32 tensors: FlashInfer's `plan()` reads
the indptr arrays on the host to schedule work (it would copy device tensors back, a sync) and
copies them to the device itself with `non_blocking=True`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from parrot_actors.cuda.flashinfer_index import (
    FlashInferIndex,
    PagedKVIndex,
    as_range,
    plan_indices,
)
from parrot_actors.cuda.layout import BatchLayout
from parrot_actors.errors import EngineError

WORKSPACE_BYTES = 128 * 1024 * 1024
"""Float workspace shared by all wrappers (FlashInfer's recommended 128 MiB): split-KV partial
outputs live there during one `run`, and the runs of one layer are sequential on one stream."""

SUPPORTED_HEAD_DIMS = (64, 128, 256)
"""Head sizes every FlashInfer prefill backend (fa2 and Hopper fa3) and the decode kernels
instantiate."""

_CUDA_CORE_DECODE_GROUPS = (1, 2, 3, 4, 6, 8)
"""GQA group sizes FlashInfer's CUDA-core decode kernel dispatches (DISPATCH_GQA_GROUP_SIZE in
include/flashinfer/utils.cuh); other sizes must use the tensor-core decode path."""


def _import_flashinfer() -> Any:
    """Import and return the `flashinfer` module. Raises `EngineError` if it is missing."""
    try:
        import flashinfer
    except ImportError as e:
        raise EngineError(
            "attention='flashinfer' needs the flashinfer-python package (0.6.x) and a CUDA GPU, "
            f"but 'import flashinfer' failed ({e}); install flashinfer-python or use "
            "attention='torch' (or 'auto')"
        ) from e
    return flashinfer


def _check_device(device: torch.device) -> None:
    """Raise `EngineError` unless `device` is a CUDA device (FlashInfer kernels are CUDA-only)."""
    if device.type != "cuda":
        raise EngineError(
            f"attention='flashinfer' runs on CUDA devices only, got device={str(device)!r}; "
            "use attention='torch' there"
        )


def use_tensor_cores(num_heads: int, num_kv_heads: int) -> bool:
    """Whether plain decode should use FlashInfer's tensor-core decode kernel: for GQA groups of
    4 or more query heads per KV head (the heuristic SGLang applies to FlashInfer decode), and for
    group sizes the CUDA-core kernel does not instantiate."""
    group = num_heads // num_kv_heads
    return group >= 4 or group not in _CUDA_CORE_DECODE_GROUPS


class _Rows:
    """A set of query rows, taken by slicing when contiguous and by index otherwise."""

    def __init__(self, rows: Sequence[int], device: torch.device) -> None:
        self.span = as_range(rows)
        self.index = (
            None
            if self.span is not None
            else torch.tensor(list(rows), dtype=torch.long).to(device, non_blocking=True)
        )

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of `x` `[n, ...]` -> `[len(rows), ...]` (a view when contiguous)."""
        if self.index is None:
            assert self.span is not None
            return x[self.span[0] : self.span[1]]
        return x.index_select(0, self.index)

    def put(self, dst: torch.Tensor, value: torch.Tensor) -> None:
        """Write `value` `[len(rows), ...]` into those rows of `dst` `[n, ...]`."""
        if self.index is None:
            assert self.span is not None
            dst[self.span[0] : self.span[1]].copy_(value)
        else:
            dst.index_copy_(0, self.index, value)


class FlashInferAttention:
    """`AttentionBackend` on FlashInfer's paged kernels (NHD layout, fp16 or bf16).

    num_heads / num_kv_heads: query and KV heads (GQA when they differ; num_heads must be a
    multiple of num_kv_heads). head_dim: one of `SUPPORTED_HEAD_DIMS`. Scale 1/sqrt(head_dim),
    causal within each sequence. The KV cache of a layer is `[num_blocks, 2, block_size,
    num_kv_heads, head_dim]` in `dtype` (FlashInfer's 5-D NHD paged cache; block = page).

    Raises `EngineError` if flashinfer does not import, the device is not CUDA, the dtype is
    not fp16/bf16, or the head shapes are unsupported. `forward` raises `RuntimeError` before
    `plan` and `ValueError` on tensors that do not match the plan.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        workspace_bytes: int = WORKSPACE_BYTES,
    ) -> None:
        flashinfer = _import_flashinfer()
        device = torch.device(device)
        _check_device(device)
        if dtype not in (torch.float16, torch.bfloat16):
            raise EngineError(
                f"attention='flashinfer' supports dtype float16 or bfloat16, got {dtype}"
            )
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise EngineError(
                f"attention='flashinfer': head_dim={head_dim} is not supported, allowed are "
                f"{SUPPORTED_HEAD_DIMS}; use attention='torch' for this model"
            )
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise EngineError(
                f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = device
        self.dtype = dtype
        self.scale = 1.0 / math.sqrt(head_dim)
        # Zeroed: the decode wrapper asks for a zero-initialised buffer on first use.
        self._workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=use_tensor_cores(num_heads, num_kv_heads)
        )
        self._cascade = flashinfer.MultiLevelCascadeAttentionWrapper(2, self._workspace, "NHD")
        self._layout: BatchLayout | None = None
        self._index: FlashInferIndex | None = None
        self._plain_rows: _Rows | None = None
        self._cascade_rows: _Rows | None = None

    @property
    def index(self) -> FlashInferIndex | None:
        """The plan lists of the last `plan` call (None before the first)."""
        return self._index

    def _i32(self, values: list[int]) -> torch.Tensor:
        """Host int32 tensor `[len(values)]`, pinned when the backend is on CUDA."""
        t = torch.tensor(values, dtype=torch.int32)
        return t.pin_memory() if self.device.type == "cuda" else t

    def _csr(self, p: PagedKVIndex) -> tuple[torch.Tensor, ...]:
        """(qo_indptr, kv_indptr, kv_indices, kv_last_page_len) as host int32 tensors."""
        return (
            self._i32(p.qo_indptr),
            self._i32(p.kv_indptr),
            self._i32(p.kv_indices),
            self._i32(p.kv_last_page_len),
        )

    def plan(self, layout: BatchLayout) -> None:
        """Build this step's FlashInfer plans once; every layer's `forward` reuses them.

        Raises `ValueError` on a malformed layout (see `flashinfer_index.plan_indices`); after
        any error `forward` refuses to run until the next successful `plan`.
        """
        self._layout = self._index = None
        index = plan_indices(layout)
        heads = (self.num_heads, self.num_kv_heads, self.head_dim, layout.block_size)
        common = {"sm_scale": self.scale, "q_data_type": self.dtype, "kv_data_type": self.dtype}
        if index.prefill is not None:
            qo, kv_indptr, kv_indices, last = self._csr(index.prefill)
            self._prefill.plan(qo, kv_indptr, kv_indices, last, *heads, causal=True, **common)
        self._plain_rows = None
        if index.plain is not None:
            _, kv_indptr, kv_indices, last = self._csr(index.plain)
            self._decode.plan(kv_indptr, kv_indices, last, *heads, **common)
            self._plain_rows = _Rows(index.plain_rows, self.device)
        self._cascade_rows = None
        if index.cascade is not None:
            levels = [self._csr(p) for p in index.cascade.levels]
            self._cascade.plan(
                [lv[0] for lv in levels],
                [lv[1] for lv in levels],
                [lv[2] for lv in levels],
                [lv[3] for lv in levels],
                *heads,
                causal=False,  # one query per member at the end of its KV: nothing to mask
                **common,
            )
            self._cascade_rows = _Rows(index.cascade.rows, self.device)
        self._layout = layout
        self._index = index

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """Attention for the planned step.

        q: `[num_tokens, num_heads, head_dim]` in the layout's token order, dtype `self.dtype`.
        kv_cache: `[num_blocks, 2, block_size, num_kv_heads, head_dim]`, same dtype. Returns
        `[num_tokens, num_heads, head_dim]`, same dtype.
        """
        layout = self._layout
        if layout is None or self._index is None:
            raise RuntimeError("FlashInferAttention.forward called before plan()")
        want_q = (layout.num_tokens, self.num_heads, self.head_dim)
        if tuple(q.shape) != want_q or q.dtype != self.dtype:
            raise ValueError(
                f"q is {tuple(q.shape)} {q.dtype}; the plan needs {want_q} {self.dtype}"
            )
        want_kv = (2, layout.block_size, self.num_kv_heads, self.head_dim)
        if kv_cache.dim() != 5 or tuple(kv_cache.shape[1:]) != want_kv:
            raise ValueError(
                f"kv_cache is {tuple(kv_cache.shape)}; expected [num_blocks, *{want_kv}]"
            )
        if kv_cache.dtype != self.dtype:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} != backend dtype {self.dtype}")
        q = q.contiguous()
        out = torch.empty_like(q)
        p = layout.num_prefill_tokens
        if self._index.prefill is not None:
            self._prefill.run(q[:p], kv_cache, out=out[:p])
        qd, od = q[p:], out[p:]
        rows = self._plain_rows
        if rows is not None:
            if rows.span is not None:
                a, b = rows.span
                self._decode.run(qd[a:b], kv_cache, out=od[a:b])
            else:
                rows.put(od, self._decode.run(rows.take(qd), kv_cache))
        rows = self._cascade_rows
        if rows is not None:
            rows.put(od, self._cascade.run(rows.take(qd).contiguous(), kv_cache))
        return out
