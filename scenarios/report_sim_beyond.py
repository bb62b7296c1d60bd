"""The simulated figures beyond the paper: agent workloads at GPU scale, where no paper number
exists (the paper predates agent sessions over the OpenAI API), so each row is ours only.
"""

from __future__ import annotations

from scenarios.report_sim_figures import (
    A100_13B,
    NET,
    SPEEDUP,
    P,
    Series,
    SimFigure,
    ratio,
    summary,
)

B = ("both", "baseline")
A100_L3 = ["--sim", "a100", "--sim-model", "llama-3-8b"]
"""Agent traffic needs long contexts (a 40-turn session passes Vicuna's 2,048 positions)."""

_LATENCY_CAP = (
    "Parrot runs at most 8 latency calls per engine (`latency_cap`, a slot count, not a time "
    "budget) while more sessions are active, so turns queue where the baseline batches them "
    "all; issue 28 (objectives in seconds) replaces the cap."
)


def _sessions() -> SimFigure:
    flags = ["--sessions", "32", "--turns", "6", "10", "--tool-latency", "0.5", "3"]
    flags += ["--tool-tokens", "100", "300", "--system-tokens", "2000"]
    flags += ["--answer-tokens", "200", "--oneshot-clients", "4", "--oneshot-tokens", "4000"]
    return SimFigure(
        "agent-sessions",
        "agent sessions",
        "multi-turn tool-using sessions over the OpenAI API",
        "agent_sessions",
        "A100-80GB, Vicuna-13B",
        "32 sessions of 6-10 turns, tool calls of 0.5-3 s returning 100-300 tokens, "
        "2,000-token system prompt, answers up to 200 tokens, beside 4 clients of "
        "4,000-6,000-token one-shot requests; baseline: automatic prefix caching and the "
        "shared-prefix kernel (a stronger baseline than the paper's vLLM); the paper's network",
        "-",
        (0,),
        lambda _: {"both": [*flags, *A100_13B, *NET, "--baseline-cascade"]},
        (
            Series("speedup", SPEEDUP, ratio(("both", "baseline"), P, "session"), (), "x"),
            Series("Parrot", "mean session (s)", summary(*P, "session", "mean_s")),
            Series(
                "baseline", "mean session (s)", summary("both", "baseline", "session", "mean_s")
            ),
        ),
        headline=(0, 0),
        why=_LATENCY_CAP,
    )


def _trace() -> SimFigure:
    flags = ["--sessions", "48", "--session-rate", "0.2", *A100_L3, *NET, "--baseline-cascade"]
    return SimFigure(
        "agent-trace",
        "agentic trace",
        "agentic trace replay: long sessions, tool gaps, sub-agents",
        "agent_trace",
        "A100-80GB, Llama-3-8B",
        "48 root sessions arriving at 0.2/s (Poisson), turns lognormal with median 40, tool "
        "results of 20-1,000 tokens after tool calls of 0.5-30 s (both log-uniform), answers "
        "of 10-300 tokens, a 2,000-token system prompt, 30% of roots with 2-4 parallel "
        "sub-agents of 3-10 turns (scenarios/agent_trace.py defaults); e2e excludes each "
        "session's own tool time; baseline: automatic prefix caching and the shared-prefix "
        "kernel; the paper's network",
        "-",
        (0,),
        lambda _: {"both": flags},
        (
            Series("speedup", SPEEDUP, ratio(("both", "baseline"), P, "session"), (), "x"),
            Series("Parrot", "mean session (s)", summary(*P, "session", "mean_s")),
            Series(
                "baseline", "mean session (s)", summary("both", "baseline", "session", "mean_s")
            ),
            Series(
                "sub-agents: speedup", SPEEDUP, ratio(("both", "baseline"), P, "sub-agent"), (), "x"
            ),
        ),
        headline=(0, 0),
        why=_LATENCY_CAP + " Here Parrot runs 8 sequences at most (the baseline up to 20) "
        "and computes less prefill than the baseline (548,908 vs 563,581 tokens at 053ed63; "
        "before it, a turn whose retained context had expired recomputed its history).",
    )


def _langchain() -> SimFigure:
    chains = ["--chunks", "16", "--chunk-tokens", "1024", "--output-tokens", "50", "--rtt"]
    chains += ["0.244"]  # LangChain's requests pass a fixed-delay proxy (netsim.DelayProxy)
    lc_speedup = "speedup over compile_chain (mean e2e)"
    return SimFigure(
        "langchain",
        "LangChain apps",
        "LangChain map-reduce and refine chains, five clients",
        "langchain_apps",
        "A100-80GB, Vicuna-13B",
        "an article in 16 chunks of 1,024 tokens, output 50, through ChatOpenAI (to the "
        "OpenAI API), ChatParrot, compile_chain and handwritten semantic functions; a "
        "fixed 244 ms round trip per request",
        "-",
        (0,),
        lambda _: {"both": [*chains, *A100_13B]},
        tuple(
            Series(
                f"{app}: {label}",
                lc_speedup,
                ratio(("both", label), ("both", "compiled"), app),
                (),
                "x",
            )
            for app in ("map-reduce", "chain")
            for label in ("chatopenai", "chatopenai-latency", "chatparrot", "handwritten")
        ),
        headline=(0, 0),
        why="compile_chain's 16 maps run 8 at a time under Parrot's latency cap where "
        "ChatOpenAI's batch runs all 16 at once (issue 28).",
    )


BEYOND_FIGURES = (_sessions(), _trace(), _langchain())
"""The workloads beyond the paper, simulated at GPU scale."""
