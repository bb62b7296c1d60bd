"""The frontend: semantic functions, Semantic Variables and the application graph."""

from __future__ import annotations

from parrot_actors.variables.function import SemanticFunction, semantic_function
from parrot_actors.variables.graph import (
    SemanticCall,
    get_consumers,
    get_perf_objective,
    get_producer,
    prefix_hash,
)
from parrot_actors.variables.perf import LATENCY, THROUGHPUT, Input, Output
from parrot_actors.variables.variable import Variable, VariableError

__all__ = [
    "LATENCY",
    "THROUGHPUT",
    "Input",
    "Output",
    "SemanticCall",
    "SemanticFunction",
    "Variable",
    "VariableError",
    "get_consumers",
    "get_perf_objective",
    "get_producer",
    "prefix_hash",
    "semantic_function",
]
