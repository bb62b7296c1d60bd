"""Engines: the model, the paged KV cache, contexts with fork, and continuous batching."""

from __future__ import annotations

from parrot_actors.engines.engine import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig"]
