"""The engine's own CPU kernels, built from C++ on first use and cached on disk.

`packed_linear` is a float32 linear layer over a weight packed once into 16-column panels
(float32, or int8 with per-column scales: `pack_weight_int8`, the engine's `dtype="int8"`)
(`csrc/packed_linear.cpp`: the BLIS register-blocked micro-kernel, Van Zee & van de Geijn,
TOMS 2015, section 3). At decode batch sizes it runs the step's matmuls 1.5-3x faster than
`torch.nn.functional.linear` on the 2-core machines this project is measured on (README,
"Measured"), because torch's BLAS is tuned for large matrices.

The source is compiled by `torch.utils.cpp_extension` (ninja and the system C++ compiler,
`-O3 -march=native -fopenmp`) into `cache_root()/kernels/<torch>-<cpu capability>/`: about 20 s
the first time on 2 cores, a `dlopen` afterwards. Builds from several processes are serialized
by an advisory lock (released by the kernel when its holder dies, so a killed build never
blocks the next one). When the build fails (no compiler, no ninja), `load_kernels` returns False
with the reason in `kernel_status()` and the engine runs torch's own linear instead.
"""

from __future__ import annotations

import fcntl
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

SOURCE = Path(__file__).parent / "csrc" / "packed_linear.cpp"
PANEL = 16
"""Output columns per packed panel (must match NR in the C++ source)."""
BUILD_LOCK_TIMEOUT_S = 300.0
"""Longest wait for another process's build of the kernels (seconds)."""

_lock = threading.Lock()
_status: str | None = None  # None: not tried; "ready"; else why the kernels are unavailable


def kernel_dir() -> Path:
    """Build folder of the kernels for this torch version and CPU instruction set."""
    tag = f"torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}".lower()
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
            sources=[str(SOURCE)],
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
