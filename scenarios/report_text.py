"""The prose of docs/results.md: the preamble and the per-entry notes (why a ratio is what
it is, read from the profile tables that `report.render` generates beside them)."""

from __future__ import annotations

PREAMBLE = """# Scenario results: the paper's workloads, Parrot vs the request-level baseline

Regenerate everything on this page (about 30 minutes on a 2-core CPU) with:

```bash
.venv/bin/python -m scenarios report            # or: --only multi-agent shared-prompt
```

Machine: {machine}. Model: SmolLM2-135M-Instruct (the embedded default), float32, torch
attention backend, one engine per service unless noted. Both modes run in one process, each
against its own fresh in-process service on 127.0.0.1 over the same model:

- **parrot**: `pa.SchedulerConfig()` (application-centric policy, prefix sharing, automatic
  prefix caching); the app uses `pa.Runtime.connect(url)`, submits its whole graph, and pays
  one simulated network round trip (250 ms) per app.
- **baseline**: `pa.SchedulerConfig(policy="fcfs", prefix_sharing=False,
  automatic_prefix_caching=False)`; the app uses `openai.AsyncOpenAI` completions with the
  exact prompt text the Parrot template renders, temperature 0, the same `max_tokens`, and
  sends a request only after the previous one's answer came back, paying 250 ms per request.
- Engine settings (EngineConfig): Parrot and the "baseline" / "baseline-throughput" columns
  use max_running=64, max_batch_tokens=2048 (4096 for throughput-tuned), except the chain
  entries where both modes use max_running=8; "baseline-latency" uses max_running=2,
  max_batch_tokens=512.

The "paper" column quotes the ratio the paper's evaluation text reports for that figure (GPU
servers, LLaMA-7B/13B, vLLM and HuggingFace baselines), as recalled in this project, so treat it
as an order of magnitude rather than a checked figure. "ours" is the measured ratio named in
the column (baseline / parrot of a latency metric: higher is better for Parrot).
"""

NOTES: dict[str, str] = {}
