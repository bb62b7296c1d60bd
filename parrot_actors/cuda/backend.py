"""The interface every attention backend implements, and the backend picker."""

from __future__ import annotations

from typing import Protocol

import torch

from parrot_actors.cuda.layout import BatchLayout


class AttentionBackend(Protocol):
    """Paged attention over a KV cache in FlashInfer's NHD layout.

    A layer's cache is `[num_blocks, 2, block_size, num_kv_heads, head_dim]` (index 0 of dim 1
    is K, 1 is V). The engine writes the step's new K/V into the cache before calling
    `forward`, so attention reads every position from the cache.
    """

    def plan(self, layout: BatchLayout) -> None:
        """Build the step's index tensors once; every layer's `forward` reuses them."""

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """Attention for the planned step.

        q: `[num_tokens, num_heads, head_dim]` in the layout's token order (prefill tokens,
        then one per decode). Returns `[num_tokens, num_heads, head_dim]`, causal within each
        sequence, scaled by 1/sqrt(head_dim).
        """


def make_backend(
    name: str,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    cpu_kernels: bool = False,
) -> AttentionBackend:
    """Return the backend `name` ("torch", "flashinfer", or "auto": FlashInfer on CUDA when it
    imports, else torch). `cpu_kernels`: the torch backend runs decode attention in the
    engine's CPU kernel (needs them loaded; see `TorchAttention`). Raises `ValueError` for an
    unknown name."""
    from parrot_actors.cuda.torch_backend import TorchAttention

    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            from parrot_actors.cuda import flashinfer_available

            name = "flashinfer" if flashinfer_available() else "torch"
    if name == "torch":
        return TorchAttention(num_heads, num_kv_heads, head_dim, device, decode_kernel=cpu_kernels)
    if name == "flashinfer":
        from parrot_actors.cuda.flashinfer_backend import FlashInferAttention

        return FlashInferAttention(num_heads, num_kv_heads, head_dim, device, dtype)
    raise ValueError(f"attention backend {name!r}: allowed are 'auto', 'torch', 'flashinfer'")
