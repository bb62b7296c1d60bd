"""Typed messages that cross layer boundaries (scheduler <-> engine, engine -> clients).

All are msgspec structs: small, immutable where possible, and serializable to JSON or msgpack
unchanged, so the same messages travel between local actors, Ray actors and HTTP.
"""

from __future__ import annotations

import math

import msgspec

from parrot_actors.errors import InvalidRequestError

LATENCY_PRIORITY = 0
"""Engine priority of latency-critical work: admitted first, preempted last."""
THROUGHPUT_PRIORITY = 1
"""Engine priority of throughput work: admitted after latency work, preempted first."""

SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
"""Seeds torch's generators accept (inclusive; torch.Generator.manual_seed)."""
MAX_STOP_STRINGS = 32
"""Stop strings per request at most (each one is searched for after every token)."""
MAX_STOP_CHARS = 512
"""Characters per stop string at most."""
MAX_LOGPROBS = 20
"""Most likely alternatives reported per token at most (OpenAI's limit)."""


class Grammar(msgspec.Struct, frozen=True, kw_only=True):
    """A constraint on generated text, enforced token by token (the engine masks every token
    that cannot continue a valid output before sampling). Exactly one field is set:

    json_schema: a JSON Schema as JSON text; the output is JSON that validates against it.
    json_object: any JSON object. regex: the output matches this regular expression (Rust
    `regex` syntax, as llguidance takes it). choices: the output is exactly one of these
    strings. lark: a context-free grammar in llguidance's Lark syntax
    (github.com/guidance-ai/llguidance docs/syntax.md; tool calls use it).

    Raises `InvalidRequestError` from `validate()` naming the field; whether a schema or
    regex compiles is checked by the engine (`engines.grammar`), also as `InvalidRequestError`.
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choices: tuple[str, ...] | None = None
    lark: str | None = None

    def validate(self) -> Grammar:
        """Return self if exactly one constraint is set and `choices` holds 1 to
        `MAX_CHOICES` non-empty strings; else raise `InvalidRequestError`."""
        given = [
            name
            for name, on in (
                ("json_schema", self.json_schema is not None),
                ("json_object", self.json_object),
                ("regex", self.regex is not None),
                ("choices", self.choices is not None),
                ("lark", self.lark is not None),
            )
            if on
        ]
        if len(given) != 1:
            raise InvalidRequestError(
                f"grammar sets {given or 'nothing'}: set exactly one of json_schema, "
                "json_object, regex, choices, lark"
            )
        if self.choices is not None and not (
            0 < len(self.choices) <= MAX_CHOICES and all(self.choices)
        ):
            raise InvalidRequestError(
                f"choices={list(self.choices)[:5]!r}: must be 1 to {MAX_CHOICES} non-empty strings"
            )
        return self


MAX_CHOICES = 1024
"""Most strings of a `Grammar.choices` constraint."""


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens in `Engine.generate`.

    temperature: 0 means greedy (argmax); > 0 (finite) scales logits (units: none); any
    positive value is numerically safe (see `engines.sampler.sample`).
    top_k: keep the k most likely tokens (0 = all). top_p: nucleus mass in (0, 1]; the most
    likely token always survives.
    seed: per-request seed in `SEED_RANGE`, so sampled outputs are reproducible
    (None = nondeterministic).
    max_tokens: tokens to generate at most (> 0).
    stop: strings that end generation (at most `MAX_STOP_STRINGS`, each 1 to `MAX_STOP_CHARS`
    characters); the returned text stops before the first match.
    stop_token_ids: token ids that end generation; None means the model's EOS ids.
    ignore_eos: keep going past EOS (benchmarks use it to fix output lengths).
    logprobs: None, or report each generated token's log-probability and the `logprobs` (0 to
    `MAX_LOGPROBS`) most likely alternatives: log-softmax of the model's logits divided by the
    temperature (of the raw logits when greedy), before top-k and top-p (and after a
    grammar's mask). grammar: None, or a `Grammar` the output must follow; the generation
    ends ("stop") when the grammar admits no further token.

    Raises `InvalidRequestError` from `validate()` naming the bad field and the allowed range.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    grammar: Grammar | None = None

    def validate(self) -> SamplingParams:
        """Return self if every field is in range, else raise `InvalidRequestError`."""
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise InvalidRequestError(
                f"temperature={self.temperature!r}: must be a finite number >= 0"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k={self.top_k!r}: must be >= 0 (0 disables it)")
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens={self.max_tokens!r}: must be > 0")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidRequestError(
                f"seed={self.seed!r}: must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs={self.logprobs!r}: must be an integer in [0, {MAX_LOGPROBS}]"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"stop: {len(self.stop)} strings given; at most {MAX_STOP_STRINGS} are allowed"
            )
        for s in self.stop:
            if not 0 < len(s) <= MAX_STOP_CHARS:
                raise InvalidRequestError(
                    f"stop={s[:40]!r}: stop strings must have 1 to {MAX_STOP_CHARS} characters"
                )
        if self.grammar is not None:
            self.grammar.validate()
        return self


class GenerateResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one `Engine.generate`.

    token_ids: generated ids (the stop token included when one ended it).
    text: decoded text, cut before a matched stop string.
    finish_reason: "stop" (EOS, stop token or stop string) or "length" (max_tokens reached).
    prompt_tokens: tokens in the context before generation. completion_tokens: len(token_ids).
    context_len: tokens in the context afterwards (a stop token never enters it).
    ttft_s / decode_s: seconds from request arrival to the first token, and from the first to
    the last token. logprobs / top_logprobs: when `SamplingParams.logprobs` asked for them, per
    generated token its log-probability and the `logprobs` most likely (token id,
    log-probability) pairs (see `SamplingParams`).
    """

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    context_len: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class TokenDelta(msgspec.Struct, frozen=True, kw_only=True):
    """One streamed step of a generation: a new token id and the text it adds (may be "" while
    a multi-byte character or a possible stop string is still incomplete). `finish_reason` and
    `result` (the whole `GenerateResult`, as `generate` returns it) are set on the last delta
    only."""

    token_id: int
    text: str
    finish_reason: str | None = None
    result: GenerateResult | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class FillResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one `Engine.fill`: tokens appended, tokens computed by this fill, and the
    context's length afterwards (all in tokens). `reused_tokens` counts tokens whose KV came from
    a fork parent or the prefix cache instead of being computed."""

    context_id: str
    appended_tokens: int
    computed_tokens: int
    reused_tokens: int
    context_len: int


class EngineStats(msgspec.Struct, kw_only=True):
    """Counters of one engine since start (tokens are counts, not rates). Counters survive
    restarts of the engine's loop; gauges describe the current KV pool.

    prefill_tokens: tokens whose KV the engine computed (fills, prompts, recomputation).
    reused_tokens: tokens whose KV was shared by fork or found in the prefix cache.
    generated_tokens: tokens sampled. preemptions: running requests whose KV was dropped to be
    recomputed later. evictions: idle contexts whose KV was dropped under KV pressure (they are
    recomputed when next used). kv_blocks_used / kv_blocks_total: blocks of the KV pool
    (block_size tokens each); kv_blocks_peak: the most blocks in use at once since the pool was
    made (Parrot Fig. 17 reports this). running / waiting: requests in the batch / queued. contexts:
    live contexts. mean_batch_size / max_batch_size: sequences per step over all steps so far.
    max_model_len: the longest context the model holds (tokens). max_running: the most
    sequences it batches in a step (0: not told).
    healthy: False while the engine's loop is down (between a failure and its rebuild).
    restarts: rebuilds after a failure of the loop. last_error: the latest such failure
    ("" if none). step_time: the engine's step-time model: for a real engine the least-squares
    fit of its measured steps (`StepTimeFit.summary()`: seconds per unit of each feature,
    `samples`, `median_abs_error` and `p90_abs_error` relative to the measured time; empty
    until enough steps ran); for a simulated engine `simulated_s` (seconds of steps predicted).
    """

    name: str = "engine0"
    model: str = ""
    prefill_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    evictions: int = 0
    steps: int = 0
    kv_blocks_used: int = 0
    kv_blocks_peak: int = 0
    kv_blocks_total: int = 0
    kv_cached_blocks: int = 0
    block_size: int = 16
    running: int = 0
    waiting: int = 0
    contexts: int = 0
    mean_batch_size: float = 0.0
    max_batch_size: int = 0
    max_model_len: int = 0
    max_running: int = 0
    healthy: bool = True
    restarts: int = 0
    last_error: str = ""
    step_time: dict[str, float] = msgspec.field(default_factory=dict)
