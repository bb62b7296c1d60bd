"""The paper's workloads replayed against Parrot and the request-level baseline.

One module per workload of the evaluation of Parrot (Lin et al., OSDI 2024, §8), each with a
Parrot implementation (semantic functions through `pa.Runtime.connect`) and a request-level
baseline (`openai` completions, one request after another, with a simulated network round
trip): `python -m scenarios bench SCENARIO --mode both` runs both in one process and prints
the comparison; `python -m scenarios report` regenerates docs/results.md.
"""

from __future__ import annotations

from types import ModuleType

SCENARIO_NAMES = (
    "chain_summary",
    "map_reduce_summary",
    "shared_prompt",
    "gpts",
    "multi_agent",
    "mixed",
    "agent_sessions",
    "langchain_apps",
    "agent_trace",
)
"""Scenario names, in the order of the paper's figures (Fig. 11-18), then agent sessions over
the OpenAI API, the LangChain apps and the agentic trace replay (beyond the paper)."""


def load(name: str) -> ModuleType:
    """The scenario module `name`. Raises `KeyError` listing the names for an unknown one."""
    import importlib

    if name not in SCENARIO_NAMES:
        raise KeyError(f"unknown scenario {name!r}; scenarios: {', '.join(SCENARIO_NAMES)}")
    return importlib.import_module(f"scenarios.{name}")
