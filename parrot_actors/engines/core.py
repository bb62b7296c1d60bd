"""The synchronous engine core: requests, continuous batching, preemption, sampling.

Deterministic and free of asyncio: the async `Engine` actor calls `schedule()` to pick the
step's work (cheap, integer bookkeeping), runs `execute()` (the forward pass, may run in a worker
thread) and then `finish_step()` to sample and report. Every other method mutates state and is
called by the engine loop only between steps (never while `execute` runs). Sources: continuous
batching (Yu et al., Orca, OSDI 2022, §4: iteration-level scheduling), chunked prefill (Agrawal
et al., Sarathi, 2023), preemption by recomputation (Kwon et al., vLLM, SOSP 2023, §4.5).

Progress under KV pressure is guaranteed by construction: a request short of blocks first drops
the KV of idle contexts (no request running on them; least recently used first), then preempts
lower-ranked running requests, then runs the chunk that fits; `schedule()` goes on to the next
request instead of stopping at one that cannot run; and if nothing at all can run while work is
queued, the best-ranked request can never fit and fails with `CapacityError` at once.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from parrot_actors import clock
from parrot_actors.cuda.layout import BatchLayout, CascadeGroup, SeqLayout, plan_cascade
from parrot_actors.engines.api import Tokenizer
from parrot_actors.engines.block_pool import BlockPool
from parrot_actors.engines.contexts import Context, ContextTable
from parrot_actors.engines.detokenizer import Detokenizer
from parrot_actors.engines.grammar import Grammars
from parrot_actors.engines.sampler import make_generator, sample, sample_rows, token_logprobs
from parrot_actors.engines.step_budget import StepBudget
from parrot_actors.engines.step_fit import StepTimeFit
from parrot_actors.engines.step_time import MODELS, StepPredictor, StepShape, StepTimeModel
from parrot_actors.errors import CapacityError, EngineError, InvalidRequestError, SamplingError
from parrot_actors.messages import (
    LATENCY_PRIORITY,
    EngineStats,
    FillResult,
    GenerateResult,
    SamplingParams,
    TokenDelta,
)

log = logging.getLogger("parrot_actors.engine")

RECENT_STEPS = 2
"""Steps during which a context just computed is spared when a new request needs room."""
REFIT_STEPS = 64
"""A real engine refits its step-time model (for `StepBudget`) after this many new steps."""

FinishCallback = Callable[[object, BaseException | None], None]
"""`on_finish(result, error)`: a `FillResult` / `GenerateResult`, or the request's error."""
TokenCallback = Callable[[TokenDelta], None]
"""`on_token(delta)`, once per sampled token of a generate."""


class ModelRunner(Protocol):
    """What `EngineCore` needs of a model: `LlamaRunner` (real weights) and `SimRunner` (the
    simulated engine) implement it.

    vocab_size: token ids are in [0, vocab_size). max_len: positions per context (tokens).
    eos_token_ids: tokens that end a generation unless its sampling says otherwise.
    row_tokens: after `forward`, the token every logits row puts all its mass on, when the
    runner knows it (None: sample from the logits; a model's logits are never one-hot).
    """

    vocab_size: int
    max_len: int
    eos_token_ids: tuple[int, ...]
    row_tokens: list[int] | None

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of KV of one block of `block_size` tokens."""
        ...

    def allocate_kv(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        """The KV cache tensors; dim 0 is the block id, dim 2 the slot in the block (the core
        copies `cache[dst, :, :n] = cache[src, :, :n]` when a fork copies a partial block)."""
        ...

    def forward(
        self,
        token_ids: list[int],
        positions: list[int],
        layout: BatchLayout,
        kv_caches: list[torch.Tensor],
        logit_rows: list[int],
    ) -> torch.Tensor:
        """One step: store KV of `token_ids` `[num_tokens]`, return float32 logits
        `[len(logit_rows), vocab_size]`."""
        ...


@dataclass(eq=False)
class Request:
    """One fill or generate on a context, from arrival to finish.

    on_token(delta) runs for every sampled token of a generate; on_finish(result, error) runs
    once, with a `FillResult`/`GenerateResult` or an exception.
    """

    kind: str  # "fill" | "generate"
    ctx: Context
    priority: int
    seq: int
    on_finish: FinishCallback
    on_token: TokenCallback | None = None
    sampling: SamplingParams | None = None
    arrival: float = field(default_factory=clock.now)
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    stop_ids: frozenset[int] = frozenset()
    matcher: Any = None  # llguidance.LLMatcher of a constrained generate
    prompt_tokens: int = 0
    appended: int = 0
    computed: int = 0
    reused: int = 0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    first_token_at: float | None = None
    running: bool = False
    done: bool = False

    def rank(self) -> tuple[int, int]:
        """Admission order: lower priority value first, then the arrival of the fill that
        started the context's current turn, so the generate after a fill keeps the place its
        fill took rather than queueing behind fills of newer contexts."""
        return (self.priority, self.ctx.arrival if self.ctx.arrival is not None else self.seq)


@dataclass
class StepPlan:
    """The work of one step: which requests compute how many tokens, and the batch layout."""

    items: list[tuple[Request, int]]  # (request, new tokens), in the layout's token order
    layout: BatchLayout
    token_ids: list[int]
    positions: list[int]
    logit_rows: list[int]
    logit_reqs: list[Request]


class EngineCore:
    """Continuous batching over one model and one KV pool.

    Each step admits requests in rank order (latency-critical before throughput, then arrival)
    within `max_batch_tokens` new tokens and `max_running` sequences: running decodes cost one
    token, fills are chunked to what the budget and the free blocks leave. A step that carries
    latency-critical work is a time budget (`StepBudget`): throughput work fills it only up to
    `latency_step_slack` more than the latency work's predicted time alone, priced by
    `step_model()` (the simulated device's model, or the fit of this engine's measured steps);
    before a real engine has a fit, throughput work adds at most `throughput_step_tokens` tokens
    instead (None for both: no limit, the request-level baseline). Throughput work still
    advances every step, so it cannot starve. When the pool runs
    out of blocks it drops idle contexts' KV, then preempts the lowest-ranked running request
    (drops its KV; recomputed when it runs again). A request that cannot fit even alone fails
    with `CapacityError`. `batch_sizes` counts steps per batch size (a histogram, bounded by
    `max_running`).
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        num_blocks: int,
        block_size: int,
        max_batch_tokens: int = 2048,
        max_running: int = 64,
        cascade: bool = True,
        prefix_caching: bool = True,
        name: str = "engine0",
        model_name: str = "",
        throughput_step_tokens: int | None = None,
        latency_step_slack: float | None = None,
        step_model: StepPredictor | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.pool = BlockPool(num_blocks, block_size)
        self.contexts = ContextTable(self.pool)
        self.kv_caches = runner.allocate_kv(num_blocks, block_size)
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.throughput_step_tokens = throughput_step_tokens
        self.latency_step_slack = latency_step_slack
        self._step_model = step_model
        self._fitted: StepTimeModel | None = None
        self._fitted_at = 0
        self.grammars = Grammars(tokenizer, runner.vocab_size)
        self.cascade = cascade
        self.prefix_caching = prefix_caching
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self.stats = EngineStats(
            name=name,
            model=model_name,
            kv_blocks_total=num_blocks,
            block_size=block_size,
            max_model_len=runner.max_len,
            max_running=max_running,
        )
        self._seq = itertools.count()
        self.batch_sizes: Counter[int] = Counter()
        # Measured step times (bounded window) and the step-time model fitted to them.
        self.step_fit = StepTimeFit(model_name or "engine")

    # ---- contexts -------------------------------------------------------------------------

    def _check_tokens(self, ctx: Context, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError(f"fill of context {ctx.id!r} with no tokens: empty prompt")
        bad = [t for t in token_ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token ids {bad[:5]} outside the vocabulary [0, {self.runner.vocab_size})"
            )
        total = len(ctx.tokens) + len(token_ids)
        if total > self.runner.max_len:
            raise InvalidRequestError(
                f"context {ctx.id!r} would hold {total} tokens; the model's maximum length is "
                f"{self.runner.max_len}"
            )

    def open_context(
        self, context_id: str, parent_context_id: str | None, parent_tokens: int | None = None
    ) -> tuple[Context, int]:
        """The context a fill appends to: existing, new, or forked from a parent (its first
        `parent_tokens` tokens; None: all). Returns the context and the tokens reused from the
        parent. Raises `InvalidRequestError` for `parent_tokens` without a parent."""
        if parent_context_id is None:
            if parent_tokens is not None:
                raise InvalidRequestError("parent_tokens needs a parent_context_id")
            if context_id in self.contexts:
                return self.contexts.get(context_id), 0
            return self.contexts.create(context_id), 0
        if context_id in self.contexts:
            raise InvalidRequestError(
                f"context {context_id!r} already exists; parent_context_id only creates new ones"
            )
        child, copy, reused = self.contexts.fork(context_id, parent_context_id, parent_tokens)
        if copy is not None:
            for cache in self.kv_caches:
                cache[copy.dst, :, : copy.num_tokens] = cache[copy.src, :, : copy.num_tokens]
        self.stats.reused_tokens += reused
        return child, reused

    def cancel_context(self, context_id: str, error: BaseException) -> int:
        """Finish every queued or running request on the context with `error`; returns how
        many. Raises `ContextNotFoundError` for an unknown context."""
        ctx = self.contexts.get(context_id)
        reqs = [r for r in self.running + self.waiting if r.ctx is ctx]
        for req in reqs:
            self.cancel(req, error)
        return len(reqs)

    def free_context(self, context_id: str) -> None:
        """Release a context's blocks (shared ones live on in their other owners); requests
        still on it fail with `EngineError`. Raises `ContextNotFoundError`."""
        self.cancel_context(context_id, EngineError(f"context {context_id!r} was freed"))
        self.contexts.free(context_id)

    # ---- requests -------------------------------------------------------------------------

    def add_fill(
        self,
        ctx: Context,
        token_ids: list[int],
        priority: int,
        reused: int,
        on_finish: FinishCallback,
    ) -> Request:
        """Append `token_ids` to `ctx` and queue their computation. Raises `InvalidRequestError`
        for an empty list, ids outside the vocabulary, or a context beyond the model length."""
        self._check_tokens(ctx, token_ids)
        req = Request(
            "fill",
            ctx,
            priority,
            next(self._seq),
            on_finish,
            appended=len(token_ids),
            reused=reused,
        )
        self._check_fits(req, len(ctx.tokens) + len(token_ids))
        ctx.tokens.extend(token_ids)
        self._admit(req)
        return req

    def add_generate(
        self,
        ctx: Context,
        sampling: SamplingParams,
        priority: int,
        on_finish: FinishCallback,
        on_token: TokenCallback | None = None,
    ) -> Request:
        """Queue a generation on `ctx`. Raises `InvalidRequestError` for bad sampling or an
        empty context, `CapacityError` if the context cannot fit the KV pool even alone."""
        sampling.validate()
        if not ctx.tokens:
            raise InvalidRequestError(
                f"generate on context {ctx.id!r} with no tokens: empty prompt"
            )
        if len(ctx.tokens) >= self.runner.max_len:
            raise InvalidRequestError(
                f"context {ctx.id!r} holds {len(ctx.tokens)} tokens, the model's maximum length "
                f"{self.runner.max_len}: no room to generate"
            )
        if sampling.stop_token_ids is not None:
            stop_ids = frozenset(sampling.stop_token_ids)
        else:
            stop_ids = frozenset() if sampling.ignore_eos else frozenset(self.runner.eos_token_ids)
        matcher = None if sampling.grammar is None else self.grammars.matcher(sampling.grammar)
        req = Request(
            "generate",
            ctx,
            priority,
            next(self._seq),
            on_finish,
            on_token,
            sampling,
            generator=make_generator(sampling),
            detok=Detokenizer(self.tokenizer, sampling.stop),
            stop_ids=stop_ids,
            matcher=matcher,
            prompt_tokens=len(ctx.tokens),
        )
        self._check_fits(req, min(len(ctx.tokens) + sampling.max_tokens, self.runner.max_len))
        self._admit(req)
        return req

    def _admit(self, req: Request) -> None:
        # A fill starts a turn on its context; the generate that follows keeps the turn's
        # place in line (see `Request.rank`).
        if req.kind == "fill" or req.ctx.arrival is None:
            req.ctx.arrival = req.seq
        self.waiting.append(req)

    def _check_fits(self, req: Request, tokens: int) -> None:
        need = -(-tokens // self.pool.block_size)
        if need > self.pool.num_blocks:
            raise CapacityError(
                f"context {req.ctx.id!r} needs {need} KV blocks for {tokens} tokens; the engine "
                f"has {self.pool.num_blocks} in all (raise kv_cache_bytes)"
            )

    def cancel(self, req: Request, error: BaseException) -> None:
        """Stop a queued or running request and report `error` to its owner."""
        if not req.done:
            self._remove(req)
            self._finish(req, None, error)

    def _remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.running = False

    def _finish(self, req: Request, result: object, error: BaseException | None) -> None:
        req.done = True
        self._remove(req)
        req.on_finish(result, error)

    def has_work(self) -> bool:
        """True if any request is queued or running."""
        return bool(self.running or self.waiting)

    # ---- one step ---------------------------------------------------------------------------

    def _start_without_compute(self, req: Request) -> bool:
        """Finish or advance a request that needs no forward pass (a fill of tokens already
        computed, a generate whose context's last logits are known). True if it was handled."""
        ctx = req.ctx
        if ctx.num_pending:
            return False
        if req.kind == "fill":
            self._finish_fill(req)
            return True
        if ctx.last_logits is None:
            # Fully computed yet without the last position's logits (no path leaves a context
            # so today): recompute it rather than leave the request waiting for nothing.
            self.contexts.drop_kv(ctx)
            return False
        if not req.output_ids:
            self._sample_safely(req, ctx.last_logits)
            return req.done
        return False

    def schedule(self) -> StepPlan | None:
        """Pick this step's work and allocate its blocks; None only when no work is left.

        Requests that can never fit (even with every idle context evicted and every other
        request preempted) fail here with `CapacityError`, so queued work never waits on an
        idle engine."""
        while True:
            plan = self._schedule_once()
            if plan is not None or not self.has_work():
                return plan
            self._fail_stuck()

    def _schedule_once(self) -> StepPlan | None:
        heads = self._context_heads()
        for req in sorted(self.waiting, key=Request.rank):
            if req in heads:
                self._start_without_compute(req)
        heads = self._context_heads()
        chosen: list[tuple[Request, int]] = []
        decodes_first = sorted(
            (r for r in self.running if r.ctx.num_pending == 1), key=Request.rank
        )
        rest = sorted(
            (r for r in self.running + self.waiting if r.ctx.num_pending != 1 or not r.running),
            key=Request.rank,
        )
        order = list(dict.fromkeys(decodes_first + rest))
        latency_here = any(r.priority <= LATENCY_PRIORITY and not r.done for r in order)
        timed = self.step_model() if latency_here and self.latency_step_slack is not None else None
        cap = self.throughput_step_tokens if latency_here and timed is None else None
        budget = None
        if timed is not None:
            budget = StepBudget(timed, self.latency_step_slack or 0.0)
            # All latency work is priced before any throughput work is fitted under it.
            order = [r for r in order if r.priority <= LATENCY_PRIORITY] + [
                r for r in order if r.priority > LATENCY_PRIORITY
            ]
        for req in order:
            room = self.max_batch_tokens - sum(n for _, n in chosen)
            throughput = req.priority > LATENCY_PRIORITY
            if cap is not None and throughput:
                used = sum(n for r, n in chosen if r.priority > LATENCY_PRIORITY)
                room = min(room, cap - used)
            if req.done or req not in heads or room <= 0 or len(chosen) >= self.max_running:
                continue
            if self.prefix_caching and not req.running:
                hit = self.contexts.match_cached(req.ctx)
                req.reused += hit
                self.stats.reused_tokens += hit
            past = req.ctx.num_computed
            want = min(req.ctx.num_pending, room)
            if budget is not None and throughput:
                want = budget.fit(past, want)
            # A request joining a batch that already runs must get its whole prompt's blocks
            # (see `_reserve`); alone it may start in whatever fits.
            whole = not req.running and bool(self.running or chosen)
            n = self._reserve(req, want, chosen, whole)
            if n == 0:
                continue  # others may still fit: never stop at one blocked request
            if budget is not None:
                budget.add(past, n, throughput)
            chosen.append((req, n))
            req.ctx.last_used = self.stats.steps
            if not req.running:
                req.running = True
                self.waiting.remove(req)
                self.running.append(req)
        if not chosen:
            return None
        return self._plan(chosen)

    def use_step_model(self, model: StepPredictor | None) -> None:
        """Price steps with `model` from now on (None: the fit of measured steps again)."""
        self._step_model = model

    def step_model(self) -> StepPredictor | None:
        """The model that prices this engine's steps: the one it was built with (a simulated
        engine's device), else the least-squares fit of its measured steps (`step_fit`, refit
        every `REFIT_STEPS` steps; None until `step_fit.min_samples` steps ran)."""
        if self._step_model is not None:
            return self._step_model
        fit = self.step_fit
        stale = self._fitted is None or fit.recorded - self._fitted_at >= REFIT_STEPS
        if stale and len(fit) >= fit.min_samples:
            fit.fit()
            if fit.coefficients is not None:
                shape = fit.model or MODELS["smollm2-135m"]  # cpu-fitted: coefficients only
                self._fitted = StepTimeModel(shape, None, coefficients=fit.coefficients)
            self._fitted_at = fit.recorded
        return self._fitted

    def _context_heads(self) -> set[Request]:
        """The oldest unfinished request of each context: requests on one context run in
        arrival order, one at a time."""
        heads: dict[int, Request] = {}
        for req in self.running + self.waiting:
            cur = heads.get(id(req.ctx))
            if cur is None or req.seq < cur.seq:
                heads[id(req.ctx)] = req
        return set(heads.values())

    def _reserve(
        self, req: Request, n: int, chosen: list[tuple[Request, int]], whole: bool = False
    ) -> int:
        """Allocate blocks for up to `n` more tokens of `req`: evict idle contexts, then
        preempt lower-ranked running requests, then shrink `n` to the blocks that are free.
        Returns the tokens reserved (0: none could be).

        `whole` (a request joining running ones): all its pending tokens' blocks, plus one
        block of headroom per running request, must be free (after the same evictions and
        preemptions), or it does not start this step; they are allocated at once, though
        only `n` tokens are computed now. Admitting it into the blocks that happen to be free
        instead makes the next block a higher-ranked decode needs preempt it, so its prompt
        is prefilled again step after step (measured: 10,016 prompt tokens computed for
        4,400 with two 2,200-token prompts in 4,096 tokens of KV; vLLM admits a request only
        when its prompt's blocks and a watermark are free, for the same reason)."""
        ctx = req.ctx
        if n <= 0:
            return 0
        if whole:
            return n if self._reserve_whole(req, chosen) else 0
        need = self.contexts.blocks_needed(ctx, ctx.num_computed + n)
        if need > self.pool.num_free:
            self._evict_idle(req, need)
        while self.contexts.blocks_needed(ctx, ctx.num_computed + n) > self.pool.num_free:
            victims = [
                r for r in self.running if r is not req and r.rank() > req.rank() and r.ctx.blocks
            ]
            if not victims:
                break
            self._preempt(max(victims, key=Request.rank), chosen)
        room = (len(ctx.blocks) + self.pool.num_free) * self.pool.block_size - ctx.num_computed
        n = min(n, room)
        if n <= 0:
            return 0
        self.contexts.ensure_blocks(ctx, ctx.num_computed + n)
        return n

    def _reserve_whole(self, req: Request, chosen: list[tuple[Request, int]]) -> bool:
        ctx = req.ctx

        def short() -> int:
            headroom = sum(1 for r in self.running if r is not req)
            return self.contexts.blocks_needed(ctx, len(ctx.tokens)) + headroom - self.pool.num_free

        if short() > 0:
            self._evict_idle(req, self.pool.num_free + short(), spare_recent=True)
        victims = [
            r for r in self.running if r is not req and r.rank() > req.rank() and r.ctx.blocks
        ]
        # Preempt only if that is enough: a preemption that still leaves it waiting is waste.
        if short() > sum(self.contexts.exclusive_blocks(r.ctx) + 1 for r in victims):
            return False
        while short() > 0 and victims:
            victim = max(victims, key=Request.rank)
            victims.remove(victim)
            self._preempt(victim, chosen)
        if short() > 0:
            return False
        self.contexts.ensure_blocks(ctx, len(ctx.tokens))
        return True

    def _evict_idle(self, req: Request, need: int, spare_recent: bool = False) -> None:
        """Drop the KV of idle contexts (no running request on them, not `req`'s own) until
        `need` blocks are free or none is left: those with no request queued first, then least
        recently used first, preferring those that free a block at once (a parent whose blocks
        its forks share frees nothing until they go too). A dropped context keeps its tokens
        and is recomputed when next used. `spare_recent` (admitting a new request): contexts
        computed in the last `RECENT_STEPS` steps are kept, since a fill that just finished is
        followed by its call's generate within a step or two, and dropping it for a newcomer
        recomputes the whole prompt (measured in Fig. 12b's simulated run: 440k prompt tokens
        computed for 222k)."""
        busy = {id(r.ctx) for r in self.running} | {id(req.ctx)}
        queued = {id(r.ctx) for r in self.waiting}
        recent = self.stats.steps - RECENT_STEPS if spare_recent else self.stats.steps + 1
        while self.pool.num_free < need:
            # Contexts with a request queued on them go last: they are needed again soon.
            idle = sorted(
                (
                    c
                    for c in self.contexts
                    if c.blocks and id(c) not in busy and c.last_used < recent
                ),
                key=lambda c: (id(c) in queued, c.last_used),
            )
            if not idle:
                return
            victim = next((c for c in idle if self.contexts.exclusive_blocks(c)), idle[0])
            self.contexts.drop_kv(victim)
            self.stats.evictions += 1

    def _preempt(self, victim: Request, chosen: list[tuple[Request, int]]) -> None:
        chosen[:] = [(r, n) for r, n in chosen if r is not victim]
        self.contexts.drop_kv(victim.ctx)
        self.running.remove(victim)
        victim.running = False
        self.waiting.append(victim)
        self.stats.preemptions += 1

    def _fail_stuck(self) -> None:
        """Nothing could run although work is queued: the best-ranked head request cannot get
        a single block even with every idle context evicted and every other request
        preempted, so it can never run; it fails rather than hangs."""
        head = min(self._context_heads(), key=Request.rank)
        self._finish(
            head,
            None,
            CapacityError(
                f"context {head.ctx.id!r} ({len(head.ctx.tokens)} tokens) cannot get KV blocks: "
                f"{self.pool.num_used} of {self.pool.num_blocks} are held by its own and shared "
                "blocks; raise kv_cache_bytes"
            ),
        )

    def _plan(self, chosen: list[tuple[Request, int]]) -> StepPlan:
        bs = self.pool.block_size
        seq_of: dict[int, tuple[Request, int]] = {}
        prefills: list[SeqLayout] = []
        decodes: list[SeqLayout] = []
        for req, n in chosen:
            ctx = req.ctx
            kv_len = ctx.num_computed + n
            seq = SeqLayout(n, kv_len, tuple(ctx.blocks[: -(-kv_len // bs)]))
            seq_of[id(seq)] = (req, n)
            (decodes if n == 1 and ctx.num_computed > 0 else prefills).append(seq)
        groups: list[CascadeGroup] = []
        if self.cascade and len(decodes) > 1:
            decodes, groups = plan_cascade(decodes, bs)
        layout = BatchLayout(bs, tuple(prefills), tuple(decodes), tuple(groups))
        items = [seq_of[id(s)] for s in layout.sequences()]
        token_ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        logit_reqs: list[Request] = []
        for req, n in items:
            ctx = req.ctx
            token_ids.extend(ctx.tokens[ctx.num_computed : ctx.num_computed + n])
            positions.extend(range(ctx.num_computed, ctx.num_computed + n))
            if n == ctx.num_pending:
                logit_rows.append(len(token_ids) - 1)
                logit_reqs.append(req)
        return StepPlan(items, layout, token_ids, positions, logit_rows, logit_reqs)

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """The step's forward pass: float32 logits `[len(plan.logit_rows), vocab]`. Touches
        only tensors and the plan, so it may run in a worker thread."""
        return self.runner.forward(
            plan.token_ids, plan.positions, plan.layout, self.kv_caches, plan.logit_rows
        )

    def step_shape(self, plan: StepPlan) -> StepShape:
        """The step-time model's view of `plan` (prefill chunks, decode lengths, cascade
        groups, LM head rows)."""
        return step_shape(plan.layout, len(plan.logit_rows))

    def record_step_time(self, plan: StepPlan, seconds: float) -> None:
        """Add a measured step (its forward pass took `seconds`) to the step-time fit's
        window (bounded; see `StepTimeFit`)."""
        self.step_fit.record(self.step_shape(plan), seconds)

    def finish_step(self, plan: StepPlan, logits: torch.Tensor) -> None:
        """Advance every request of the step: count computed tokens, store or sample logits,
        finish what is done. Requests finished since `schedule` (cancelled or freed while the
        forward pass ran) are skipped."""
        self.stats.steps += 1
        self.batch_sizes[len(plan.items)] += 1
        for req, n in plan.items:
            # A decode computes the one token it sampled; everything else is prefill, including
            # recomputation after preemption.
            decode = (
                req.kind == "generate"
                and n == 1
                and bool(req.output_ids)
                and (req.ctx.num_pending == 1)
            )
            self.stats.prefill_tokens += 0 if decode else n
            if req.done:
                continue  # cancelled or freed during the step: its context may be gone
            req.ctx.num_computed += n
            req.computed += n
            if self.prefix_caching:
                self.contexts.register_full_blocks(req.ctx)
        rows = {id(r): i for i, r in enumerate(plan.logit_reqs)}
        masked = self._masked_rows(
            [r for r, _ in plan.items if not r.done and r.matcher is not None and id(r) in rows],
            rows,
            logits,
        )
        chosen = self._batched_tokens(plan, rows, logits)
        for req, _ in plan.items:
            if req.done:
                continue
            row = rows.get(id(req))
            if row is None:
                continue
            last = logits[row]
            req.ctx.last_logits = last
            if req.kind == "fill":
                self._finish_fill(req)
                continue
            self._sample_safely(req, last, masked.get(id(req)), chosen.get(id(req)))

    def _batched_tokens(
        self, plan: StepPlan, rows: dict[int, int], logits: torch.Tensor
    ) -> dict[int, int]:
        """The next token of every unconstrained generate request of the step (by request id;
        -1 where its logits hold NaN) from one `sample_rows` call over their rows of `logits`
        `[rows, vocab]`: greedy rows one argmax and NaN check on the device, sampled rows one
        host transfer, instead of reductions and transfers per request. Same tokens as
        `sample` per request. Empty when the batched call fails, so every request then samples
        alone and a fault fails only its own request."""
        reqs, params = [], []
        for r, _ in plan.items:
            if not r.done and r.kind == "generate" and r.matcher is None and id(r) in rows:
                if r.sampling is not None:
                    reqs.append(r)
                    params.append(r.sampling)
        if not reqs:
            return {}
        known = self.runner.row_tokens
        if known is not None:
            # The runner knows each row's likeliest token (the simulated engine's logits are
            # one-hot): the same tokens as the argmax, without passes over [rows, vocab].
            return {id(r): known[rows[id(r)]] for r in reqs}
        sub = logits[[rows[id(r)] for r in reqs]]  # [requests, vocab]
        try:
            tokens = sample_rows(sub, params, [r.generator for r in reqs])
        except Exception:
            log.exception("batched sampling failed; sampling request by request")
            return {}
        return {id(r): t for r, t in zip(reqs, tokens)}

    def _masked_rows(
        self, reqs: list[Request], rows: dict[int, int], logits: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """The grammar-masked logits `[vocab]` of each constrained request (by id), from one
        batched mask over their rows of `logits` `[rows, vocab]`. A failing mask fails the
        requests it was for (SamplingError), never the step."""
        if not reqs:
            return {}
        try:
            out = self.grammars.masked(
                logits[[rows[id(r)] for r in reqs]], [r.matcher for r in reqs]
            )
        except Exception as exc:
            for req in reqs:
                self._finish(req, None, SamplingError(f"grammar mask failed: {exc!r}"))
            return {}
        return {id(r): out[i] for i, r in enumerate(reqs)}

    def _finish_fill(self, req: Request) -> None:
        ctx = req.ctx
        self._finish(
            req,
            FillResult(
                context_id=ctx.id,
                appended_tokens=req.appended,
                computed_tokens=req.computed,
                reused_tokens=req.reused,
                context_len=len(ctx.tokens),
            ),
            None,
        )

    def _sample_safely(
        self,
        req: Request,
        logits: torch.Tensor,
        masked: torch.Tensor | None = None,
        chosen: int | None = None,
    ) -> None:
        """`_sample_into`, with any failure (sampling, grammar, stop strings, detokenization,
        the token callback) failing this request only."""
        try:
            self._sample_into(req, logits, masked, chosen)
        except Exception as exc:
            if req.done:
                return
            error = exc if isinstance(exc, SamplingError) else SamplingError(repr(exc))
            self._finish(
                req,
                None,
                SamplingError(f"generation on context {req.ctx.id!r} failed: {error}"),
            )

    def _sample_into(
        self,
        req: Request,
        logits: torch.Tensor,
        masked: torch.Tensor | None = None,
        chosen: int | None = None,
    ) -> None:
        """Sample the next token of `req` from `logits` `[vocab]` (from `masked`, its grammar's
        mask applied, for a constrained request; masked here when the caller has not), or take
        `chosen` (the step's batched greedy pick; -1: the logits hold NaN), and advance the
        request. The context keeps the unmasked logits. Raises `SamplingError`."""
        sp, detok = req.sampling, req.detok
        assert sp is not None and detok is not None, "a generate request has both"
        if req.matcher is not None and masked is None:
            masked = self.grammars.masked(logits[None], [req.matcher])[0]
        pick = logits if masked is None else masked
        if chosen is None:
            token = sample(pick, sp, req.generator)
        elif chosen < 0:
            raise SamplingError("the model's logits contain NaN")
        else:
            token = chosen
        grammar_done = False
        if req.matcher is not None:
            if not req.matcher.consume_token(token):
                raise SamplingError(f"grammar refused token {token}: {req.matcher.get_error()}")
            grammar_done = req.matcher.is_stopped()
        logprob: float | None = None
        top: list[tuple[int, float]] | None = None
        if sp.logprobs is not None:
            logprob, top = token_logprobs(pick, sp, token, sp.logprobs)
            req.logprobs.append(logprob)
            req.top_logprobs.append(top)
        now = clock.now()
        req.first_token_at = req.first_token_at or now
        req.output_ids.append(token)
        req.ctx.tokens.append(token)
        req.ctx.last_logits = None
        self.stats.generated_tokens += 1
        delta_text, stop_hit = detok.add(token)
        reason = None
        if token in req.stop_ids:
            reason = "stop"
            # A stop token ends the output and never enters the context; the logits it was
            # drawn from stay the context's last logits (nothing is pending again).
            req.ctx.tokens.pop()
            req.ctx.last_logits = logits
        elif stop_hit or grammar_done:
            reason = "stop"
        elif len(req.output_ids) >= sp.max_tokens or len(req.ctx.tokens) >= self.runner.max_len:
            reason = "length"
        if req.on_token is not None:
            req.on_token(
                TokenDelta(
                    token_id=token,
                    text=delta_text if reason is None else delta_text + detok.flush(),
                    finish_reason=reason,
                    logprob=logprob,
                    top_logprobs=top,
                )
            )
        if reason is not None:
            text = detok.final_text()
            self._finish(
                req,
                GenerateResult(
                    token_ids=list(req.output_ids),
                    text=text,
                    finish_reason=reason,
                    prompt_tokens=req.prompt_tokens,
                    completion_tokens=len(req.output_ids),
                    context_len=len(req.ctx.tokens),
                    ttft_s=req.first_token_at - req.arrival,
                    decode_s=now - req.first_token_at,
                    logprobs=list(req.logprobs) if sp.logprobs is not None else None,
                    top_logprobs=list(req.top_logprobs) if sp.logprobs is not None else None,
                ),
                None,
            )

    def rebuilt(self) -> EngineCore:
        """A fresh core over the same model and tokenizer: a new, empty KV pool (new
        tensors), no contexts, no requests; counters carried over. Used after the loop failed,
        since the failed step may have left the KV and the bookkeeping half-updated. The old
        core must not be used afterwards (its KV tensors are released first, so peak memory
        stays one pool)."""
        self.kv_caches = []
        core = EngineCore(
            self.runner,
            self.tokenizer,
            self.pool.num_blocks,
            self.pool.block_size,
            max_batch_tokens=self.max_batch_tokens,
            max_running=self.max_running,
            cascade=self.cascade,
            prefix_caching=self.prefix_caching,
            throughput_step_tokens=self.throughput_step_tokens,
            latency_step_slack=self.latency_step_slack,
            step_model=self._step_model,
            name=self.stats.name,
            model_name=self.stats.model,
        )
        keep = ("prefill_tokens", "reused_tokens", "generated_tokens", "preemptions", "evictions")
        for f in (*keep, "steps"):
            setattr(core.stats, f, getattr(self.stats, f))
        core.stats.kv_blocks_peak = max(self.stats.kv_blocks_peak, self.pool.peak_used)
        core.batch_sizes = self.batch_sizes
        core.step_fit = self.step_fit
        return core

    def fail_all(self, error: EngineError) -> None:
        """Finish every queued and running request with `error` (shutdown, or a failed loop)."""
        for req in list(self.running + self.waiting):
            if not req.done:
                self._finish(req, None, error)

    def snapshot(self) -> EngineStats:
        """Current counters (a copy)."""
        s = self.stats
        s.kv_blocks_used = self.pool.num_used
        s.kv_blocks_peak = max(s.kv_blocks_peak, self.pool.peak_used)
        s.kv_cached_blocks = self.pool.num_cached_free
        s.running = len(self.running)
        s.waiting = len(self.waiting)
        s.contexts = len(self.contexts)
        steps = sum(self.batch_sizes.values())
        if steps:
            s.mean_batch_size = sum(k * v for k, v in self.batch_sizes.items()) / steps
            s.max_batch_size = max(self.batch_sizes)
        return EngineStats(**{f: getattr(s, f) for f in s.__struct_fields__})


def step_shape(layout: BatchLayout, logit_rows: int) -> StepShape:
    """A step's `StepShape`: prefill chunks as (new tokens, tokens before them), decodes as
    context lengths, cascade groups of 2+ members as (shared prefix tokens, members), and the
    LM head's rows."""
    bs = layout.block_size
    return StepShape(
        prefill=tuple((s.query_len, s.kv_len - s.query_len) for s in layout.prefills),
        decode=tuple(s.kv_len for s in layout.decodes),
        shared=tuple(
            (g.shared_blocks * bs, len(g.members))
            for g in layout.cascade_groups
            if g.shared_blocks and len(g.members) > 1
        ),
        logit_rows=logit_rows,
    )


__all__ = ["EngineCore", "ModelRunner", "Request", "StepPlan", "LATENCY_PRIORITY", "step_shape"]
