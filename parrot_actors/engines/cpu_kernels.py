"""The engine's own CPU kernels, built from C++ on first use and cached on disk.

`packed_linear` is a float32 linear layer over a weight packed once into 16-column panels
(float32, or int8 with per-column scales: `pack_weight_int8`, the engine's `dtype="int8"`)
(`csrc/packed_linear.cpp`: the BLIS register-blocked micro-kernel, Van Zee & van de Geijn,
TOMS 2015, section 3). At decode batch sizes it runs the step's matmuls 1.5-3x faster than
`torch.nn.functional.linear` on the 2-core machines this project is measured on (docs/guide.md,
"Measured"), because torch's BLAS is tuned for large matrices. The fused elementwise ops and
paged decode attention are in `csrc/fused_ops.cpp`; `decoder_layer` runs a whole layer of a
decode step from C++ (`csrc/decoder_layer.cpp`).

The source is compiled by `torch.utils.cpp_extension` (ninja and the system C++ compiler,
`-O3 -march=native -fopenmp`) into `cache_root()/kernels/<torch>-<cpu>-<headers>/`: about 20 s
the first time on 2 cores, a `dlopen` afterwards. Builds from several processes are serialized
by an advisory lock (released by the kernel when its holder dies, so a killed build never
blocks the next one). When the build fails (no compiler, no ninja), `load_kernels` returns False
with the reason in `kernel_status()` and the engine runs torch's own linear instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from parrot_actors.engines.model_loader import cache_root
from parrot_actors.errors import EngineError

log = logging.getLogger("parrot_actors.engine")

SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in ("packed_linear.cpp", "fused_ops.cpp", "decoder_layer.cpp")
]
"""The C++ sources of the `parrot_kernels` torch library, built into one shared object."""
HEADERS = [Path(__file__).parent / "csrc" / "kernels.h"]
"""Headers the sources include (part of the build folder's name: torch's build cache hashes
only the sources)."""
PANEL = 16
"""Output columns per packed panel (must match NR in the C++ source)."""
BUILD_LOCK_TIMEOUT_S = 300.0
"""Longest wait for another process's build of the kernels (seconds)."""

_lock = threading.Lock()
_status: str | None = None  # None: not tried; "ready"; else why the kernels are unavailable


def kernel_dir() -> Path:
    """Build folder of the kernels for this torch version, CPU instruction set and headers."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in HEADERS)).hexdigest()[:8]
    tag = f"torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}-{digest}".lower()
    return cache_root() / "kernels" / tag.replace("+", "_")


def kernel_status() -> str:
    """ "ready", "not built" (never tried in this process), or why the kernels are unavailable."""
    return _status or "not built"


def load_kernels() -> bool:
    """Build (first time) or load the kernels into this process; True when they are usable.

    Safe from any thread and process; tries once per process. Never raises: a failed build
    is logged and leaves `kernel_status()` saying why.
    """
    global _status
    with _lock:
        if _status is None:
            try:
                _build()
                _status = "ready"
            except Exception as e:  # any build failure means: run without the kernels
                _status = f"unavailable: {type(e).__name__}: {e}"[:500]
                log.warning("CPU kernels not built, using torch's linear: %s", _status)
        return _status == "ready"


def _build() -> None:
    from torch.utils.cpp_extension import load

    folder = kernel_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # ninja from PyPI lives beside the interpreter, which need not be on PATH.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    t0 = time.perf_counter()
    with open(folder / "parrot.lock", "w") as lockfile:
        while True:
            try:
                fcntl.flock(lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.perf_counter() - t0 > BUILD_LOCK_TIMEOUT_S:
                    raise TimeoutError(
                        f"another process held {folder / 'parrot.lock'} for "
                        f"{BUILD_LOCK_TIMEOUT_S:.0f} s"
                    ) from None
                time.sleep(0.2)
        waited = time.perf_counter() - t0
        # We hold the only build lock: a baton torch left behind was left by a dead build.
        (folder / "lock").unlink(missing_ok=True)
        load(
            name="parrot_kernels",
            sources=[str(p) for p in SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    took = time.perf_counter() - t0 - waited
    if took > 2.0:  # a load of a built library takes well under a second
        log.warning("built the CPU kernels in %.1f s (once per machine) -> %s", took, folder)


@dataclass(frozen=True)
class PackedWeight:
    """A linear layer's weight in kernel layout.

    panels: `[ceil(out_features / 16), in_features, 16]`, zero-padded columns; float32, or
    int8 with `scales` (float32 `[ceil(out_features / 16) * 16]`, one per output column: the
    weight is `panels * scales`). out_features, in_features: the original weight's
    `[out_features, in_features]`.
    """

    panels: torch.Tensor
    out_features: int
    in_features: int
    scales: torch.Tensor | None = None


def _check_matrix(fn: str, w: torch.Tensor) -> None:
    """Raise `EngineError` naming `fn` unless `w` is a float32 CPU matrix."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.device.type != "cpu":
        raise EngineError(
            f"{fn}: need a float32 CPU matrix, got {w.dtype} {tuple(w.shape)} on {w.device}"
        )


def pack_weight(w: torch.Tensor) -> PackedWeight:
    """Pack a float32 CPU weight `[out_features, in_features]` for `packed_linear`.

    Raises `EngineError` for another dtype, device or rank.
    """
    _check_matrix("pack_weight", w)
    n, k = w.shape
    pad = (-n) % PANEL
    panels = F.pad(w, (0, 0, 0, pad)).view(-1, PANEL, k).transpose(1, 2).contiguous()
    return PackedWeight(panels=panels, out_features=int(n), in_features=int(k))


def pack_weight_int8(w: torch.Tensor) -> PackedWeight:
    """Quantize a float32 CPU weight `[out_features, in_features]` to int8 and pack it.

    Symmetric, one scale per output row of `w` (absmax / 127; an all-zero row gets scale 1),
    LLM.int8()'s vector-wise quantization without its outlier path (Dettmers et al. 2022,
    section 3.1). Raises `EngineError` for another dtype, device or rank.
    """
    _check_matrix("pack_weight_int8", w)
    scale = w.abs().amax(dim=1) / 127.0  # [out_features]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    packed = pack_weight(q.float())
    pad = packed.panels.shape[0] * PANEL - scale.numel()
    return PackedWeight(
        panels=packed.panels.to(torch.int8),
        out_features=packed.out_features,
        in_features=packed.in_features,
        scales=F.pad(scale, (0, pad)).contiguous(),
    )


def packed_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """`x @ W.T` for float32 CPU `x` `[M, in_features]` -> float32 `[M, out_features]`, W
    float32 or int8 (`pack_weight_int8`).

    Needs `load_kernels()` to have returned True. Raises `RuntimeError` (from the kernel's
    checks) for a wrong dtype or shape.
    """
    ops = torch.ops.parrot_kernels
    y: torch.Tensor
    if w.scales is not None:
        y = ops.packed_linear_int8(x.contiguous(), w.panels, w.scales, w.out_features)
    else:
        y = ops.packed_linear(x.contiguous(), w.panels, w.out_features)
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in one pass: `w * x / sqrt(mean(x**2, -1) + eps)`.

    x: float32 CPU `[num_tokens, hidden]`, w `[hidden]`. Returns a new `[num_tokens, hidden]`.
    Source: Zhang & Sennrich, "Root Mean Square Layer Normalization" (NeurIPS 2019), eq. 4.
    Needs `load_kernels()`. Raises `RuntimeError` for a wrong dtype or shape.
    """
    y: torch.Tensor = torch.ops.parrot_kernels.rms_norm(x.contiguous(), w, eps)
    return y


def add_rms_norm_(x: torch.Tensor, d: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The residual add and the next RMSNorm in one pass: `x += d` in place, then returns
    `rms_norm(x, w, eps)`.

    x, d: float32 CPU `[num_tokens, hidden]` (x contiguous: it is written), w `[hidden]`.
    Needs `load_kernels()`. Raises `RuntimeError` for a wrong dtype or shape.
    """
    y: torch.Tensor = torch.ops.parrot_kernels.add_rms_norm_(x, d.contiguous(), w, eps)
    return y


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation in one pass: `silu(gate) * up` for gu = `[gate | up]`.

    gu: float32 CPU `[num_tokens, 2 * intermediate]` -> `[num_tokens, intermediate]`. Source:
    Shazeer, "GLU Variants Improve Transformer" (2020), eq. 6. exp is a vectorized Cephes
    polynomial (~1 ulp), so values can differ from `F.silu` in the last bit. Needs
    `load_kernels()`. Raises `RuntimeError` for a wrong dtype or an odd width.
    """
    y: torch.Tensor = torch.ops.parrot_kernels.silu_mul(gu.contiguous())
    return y


def rope_store_kv_(
    qkv: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """Rotary embedding on the q and k heads of a fused projection, in place, and the step's
    K and V into a layer's paged cache, in one pass.

    qkv: float32 CPU `[num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]` (q heads, k
    heads, v heads); pos: int64 `[num_tokens]` positions; cos, sin: `[max_len, head_dim]` tables
    (rotate-half form, Su et al., "RoFormer" 2021, section 3.4.2, as transformers' Llama);
    kv_cache: `[num_blocks, 2, block_size, num_kv_heads, head_dim]`; kv_slots: int64 `[2 *
    num_tokens]` rows of the flat cache, K then V (`torch_backend.kv_slot_rows`). Needs
    `load_kernels()`. Raises `RuntimeError` for a wrong shape, a position or a slot out of range.
    """
    torch.ops.parrot_kernels.rope_store_kv_(
        qkv, pos, cos, sin, kv_cache, kv_slots, num_heads, num_kv_heads
    )


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence attending to its KV read in place from the paged cache.

    q: float32 CPU `[batch, num_heads, head_dim]` (heads contiguous; rows may be strided, e.g. a
    view of the fused projection); kv_cache: `[num_blocks, 2, block_size, num_kv_heads,
    head_dim]`; block_tables: int64 `[batch, max_blocks]`; kv_lens: int64 `[batch]` tokens, each
    in [1, max_blocks * block_size]. Returns `[batch, num_heads, head_dim]`. Grouped-query: query
    head j reads kv head `j // (num_heads // num_kv_heads)`. Source: vLLM's PagedAttention (Kwon
    et al., SOSP 2023, section 4.1) with FlashAttention's online softmax (Dao et al. 2022,
    section 3.1). Needs `load_kernels()`. Raises `RuntimeError` for a wrong shape, a length or a
    block id out of range.
    """
    y: torch.Tensor = torch.ops.parrot_kernels.paged_decode_attention(
        q, kv_cache, block_tables, kv_lens, scale
    )
    return y


@dataclass(frozen=True)
class LayerOperands:
    """A decoder layer's matmul weights as `decoder_layer` takes them: `weights` the panels of
    [qkv, o, gate_up, down], `scales` their int8 scales (empty for float32), `out_features`
    their output widths."""

    weights: list[torch.Tensor]
    scales: list[torch.Tensor]
    out_features: list[int]


def layer_operands(
    qkv: PackedWeight, o: PackedWeight, gate_up: PackedWeight, down: PackedWeight
) -> LayerOperands:
    """Collect one layer's packed weights for `decoder_layer` (once, at load). Raises
    `EngineError` when some are int8 and some float32."""
    mats = (qkv, o, gate_up, down)
    int8 = [m.scales is not None for m in mats]
    if any(int8) and not all(int8):
        raise EngineError("layer_operands: the four weights must all be int8 or all float32")
    return LayerOperands(
        weights=[m.panels for m in mats],
        scales=[m.scales for m in mats if m.scales is not None],
        out_features=[m.out_features for m in mats],
    )


def decoder_layer(
    x: torch.Tensor,
    h: torch.Tensor,
    ops: LayerOperands,
    norm2: torch.Tensor,
    next_norm: torch.Tensor | None,
    kv_cache: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_slots: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    scale: float,
) -> torch.Tensor:
    """One Llama decoder layer of a decode step (one query token per sequence) in one call:
    the same kernels in the same order as the op-by-op path (`packed_linear`,
    `rope_store_kv_`, `paged_decode_attention`, `add_rms_norm_`, `silu_mul`), run from C++
    so that Python is crossed once per layer instead of nine times (csrc/decoder_layer.cpp).

    x: float32 `[batch, hidden]` residual stream, updated in place; h: x normed by this
    layer's input norm; norm2: the post-attention norm `[hidden]`; next_norm: the next layer's
    input norm, or None for the last layer; kv_cache, pos, cos, sin, kv_slots as
    `rope_store_kv_`; block_tables `[batch, max_blocks]`, kv_lens `[batch]` as
    `paged_decode_attention` (lengths include the new token). Returns the next layer's h
    `[batch, hidden]`, or for the last layer the MLP output (already added into x). Needs
    `load_kernels()`. Raises `RuntimeError` for a wrong shape, position, slot or block id.
    """
    y: torch.Tensor = torch.ops.parrot_kernels.decoder_layer(
        x,
        h,
        ops.weights,
        ops.scales,
        ops.out_features,
        norm2,
        next_norm,
        kv_cache,
        pos,
        cos,
        sin,
        kv_slots,
        block_tables,
        kv_lens,
        num_heads,
        num_kv_heads,
        eps,
        scale,
    )
    return y
