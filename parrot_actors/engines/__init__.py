"""Engines: the model, the paged KV cache, contexts with fork, and continuous batching."""

from __future__ import annotations

from parrot_actors.engines.engine import Engine, EngineConfig
from parrot_actors.engines.sim import SimConfig

__all__ = ["Engine", "EngineConfig", "SimConfig"]
