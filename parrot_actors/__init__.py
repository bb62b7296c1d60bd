"""parrot_actors: serving LLM applications as graphs of Semantic Variables.

The public API (names are a contract; see DESIGN.md): semantic_function, Variable, Input,
Output, LATENCY, THROUGHPUT, gather, Runtime, EngineConfig, SchedulerConfig, and the errors.
"""

from __future__ import annotations

from parrot_actors.engines.engine import EngineConfig
from parrot_actors.errors import (
    CallError,
    CapacityError,
    EngineError,
    ParrotError,
    SessionError,
    TemplateError,
)
from parrot_actors.runtime import Runtime, gather
from parrot_actors.scheduler.config import SchedulerConfig
from parrot_actors.variables import (
    LATENCY,
    THROUGHPUT,
    Input,
    Output,
    Variable,
    VariableError,
    get_consumers,
    get_perf_objective,
    get_producer,
    prefix_hash,
    semantic_function,
)

__all__ = [
    "LATENCY",
    "THROUGHPUT",
    "CallError",
    "CapacityError",
    "EngineConfig",
    "EngineError",
    "Input",
    "Output",
    "ParrotError",
    "Runtime",
    "SchedulerConfig",
    "SessionError",
    "TemplateError",
    "Variable",
    "VariableError",
    "gather",
    "get_consumers",
    "get_perf_objective",
    "get_producer",
    "prefix_hash",
    "semantic_function",
]
