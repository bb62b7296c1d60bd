"""Any OpenAI-compatible server as the baseline (`--baseline-url URL [--baseline-model NAME]`).

The baseline mode then drives that server the request-level way, with the same clients as
against our own baseline (OpenAI completions and chat completions, one request after another,
no Parrot API call). What it computed comes from its Prometheus `/metrics` when it exposes
ours (`parrot_engine_*_total`), vLLM's (`vllm:prompt_tokens_total`,
`vllm:generation_tokens_total`, `vllm:prefix_cache_hits_total`, `vllm:num_preemptions_total`,
`vllm:iteration_tokens_total` a histogram with one sample per engine step; names from vLLM's
docs/usage/metrics.md, V1 engine) or SGLang's (`sglang:prompt_tokens_total`,
`sglang:generation_tokens_total`, `sglang:cached_tokens_total`; SGLang's
docs/references/production_metrics.md); else the token counters are "n/a". The server is named
from `GET /version` (vLLM's and ours) and the model list's `owned_by`.
"""

from __future__ import annotations

import math

from scenarios.records import TokenStats

COUNTERS = ("prefill_tokens", "reused_tokens", "generated_tokens", "steps", "preemptions")
"""The engine counters a mode reports (`TokenStats` fields), summed over engines."""

_NAMESPACES = ("parrot_engine_", "vllm:", "sglang:")


def parse_counters(text: str) -> TokenStats:
    """The engine counters in a Prometheus exposition `text`, summed over every label set
    (engines, models). Ours: taken as they are (`source` "parrot_actors"). vLLM / SGLang: their
    prompt tokens include the ones served from the prefix cache, so computed = prompt - cache
    hits and reused = hits (`source` "vllm" / "sglang"); a counter the server lacks is 0 (steps:
    vLLM only). No known counter: every field 0 and `source` "n/a". Raises `ValueError` for text
    that is not the exposition format."""
    from prometheus_client.parser import text_string_to_metric_families

    seen: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total") or sample.name.endswith("_total_count"):
                seen[sample.name] = seen.get(sample.name, 0.0) + sample.value
    ours = {c: seen.get(f"parrot_engine_{c}_total") for c in COUNTERS}
    if any(v is not None for v in ours.values()):
        return TokenStats(**{c: _int(v) for c, v in ours.items()}, source="parrot_actors")
    for ns, hits in (("vllm:", "prefix_cache_hits_total"), ("sglang:", "cached_tokens_total")):
        prompt = seen.get(f"{ns}prompt_tokens_total")
        if prompt is None:
            continue
        cached = seen.get(ns + hits, 0.0)
        return TokenStats(
            prefill_tokens=_int(prompt - cached),
            reused_tokens=_int(cached),
            generated_tokens=_int(seen.get(f"{ns}generation_tokens_total")),
            steps=_int(seen.get(f"{ns}iteration_tokens_total_count")),
            preemptions=_int(seen.get(f"{ns}num_preemptions_total")),
            source=ns.rstrip(":"),
        )
    return TokenStats(source="n/a")


def _int(v: float | None) -> int:
    return 0 if v is None or math.isnan(v) else round(v)


def difference(before: TokenStats, after: TokenStats) -> TokenStats:
    """What a run added to the counters (`after` - `before`), with `after`'s source."""
    return TokenStats(
        **{c: getattr(after, c) - getattr(before, c) for c in COUNTERS}, source=after.source
    )


def server_name(version_body: object, owned_by: str) -> dict[str, str]:
    """{"name", "version"} of a server from its `GET /version` JSON body (None when it had no
    such route) and its first model's `owned_by`: vLLM answers {"version": "0.x"} and owns its
    models as "vllm"; ours answers {"version", "server": "parrot_actors"}."""
    body = version_body if isinstance(version_body, dict) else {}
    name = str(body.get("server") or owned_by or "unknown")
    return {"name": name, "version": str(body.get("version") or "unknown")}
