"""Attention backends: a pure-torch reference (CPU and GPU) and FlashInfer (GPU, imported
lazily so the package works where FlashInfer is not installed)."""

from __future__ import annotations

import importlib.util


def flashinfer_available() -> bool:
    """True if the `flashinfer` package can be imported (does not import it)."""
    return importlib.util.find_spec("flashinfer") is not None
