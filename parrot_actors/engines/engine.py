"""The engine actor: an asyncio shell around `EngineCore`, and its supervisor.

The paper's engine API (Parrot, OSDI 2024, §6): `fill`, `generate`, `free_context`. Operations
on one context run in the order they were called; different contexts run concurrently and are
batched together step by step.

The engine loop owns its state. A step's forward pass runs in a worker thread, so the event loop
keeps accepting requests during it, but nothing the event loop does touches the core: every
mutation (admitting a fill or generate, a fork with its block copy, a cancel, a free) is a
command that the loop applies between steps, in arrival order (the models: vLLM's engine busy
loop, mini-sglang's deferred frees): after a step's forward pass has returned and before its
results are processed, so a request cancelled or freed during a step is skipped when the step
completes, and its blocks return to the pool only after the pass that may write them.

Supervision: if the loop itself raises (a bug, a device fault), the engine logs the traceback,
marks itself unhealthy (`healthy`, `stats()`, and so `/health` and `/metrics`), fails every
request in flight with `EngineDiedError` (the scheduler retries calls that delivered nothing),
waits `restart_backoff_s` (doubling while failures repeat within a minute), rebuilds its core (a
fresh KV pool; the model is kept) and serves again. Contexts that died with the old core answer
`EngineDiedError` when used; freeing them succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import torch

from parrot_actors import clock
from parrot_actors.cuda.backend import make_backend
from parrot_actors.engines.api import EngineClient, Tokenizer, TokenizerMethods
from parrot_actors.engines.core import EngineCore, FinishCallback, ModelRunner, Request, StepPlan
from parrot_actors.engines.cpu_kernels import kernel_status, load_kernels
from parrot_actors.engines.llama import LlamaRunner
from parrot_actors.engines.model_loader import (
    DEFAULT_MODEL,
    load_model,
    load_tokenizer,
    random_model,
)
from parrot_actors.engines.sim import SimConfig, SimRunner
from parrot_actors.engines.step_time import StepPredictor
from parrot_actors.errors import CapacityError, EngineDiedError, EngineError, InvalidRequestError
from parrot_actors.messages import (
    LATENCY_PRIORITY,
    EngineStats,
    FillResult,
    GenerateResult,
    SamplingParams,
    TokenDelta,
)

log = logging.getLogger("parrot_actors.engine")

T = TypeVar("T")

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    # Weight-only int8: matmul weights int8 with per-column scales (the packed CPU kernel),
    # everything else (embeddings, norms, KV cache, activations) float32.
    "int8": torch.float32,
}

MAX_RESTART_BACKOFF_S = 30.0
"""Longest wait before rebuilding a core that keeps failing (seconds)."""
CRASH_WINDOW_S = 60.0
"""Failures closer together than this (seconds) double the backoff; a longer quiet resets it."""
MAX_LOST_CONTEXTS = 65536
"""Ids of contexts lost in a restart that are remembered (so using one says why it is gone)."""


class EngineConfig(msgspec.Struct, kw_only=True):
    """How to build one engine.

    model: "default" (the embedded SmolLM2-135M-Instruct) or a local Hugging Face folder.
    random_model: LlamaConfig fields for a random-weight model (tests, speed benchmarks);
    overrides `model`, weights seeded by `seed`. device: "cpu", "cuda", "cuda:N".
    dtype: "float32" (CPU default), "bfloat16", "float16", or "int8" (CPU only: weight-only
    int8 matmul weights through the packed kernel, the rest float32; docs/guide.md "Measured"
    gives its speed and perplexity cost; always runs the kernels, whatever `compile` says).
    device "sim": a simulated engine (`engines/sim.py`): this core and loop over `sim`'s
    step-time model and KV size instead of a model's weights (`model` and `dtype` unused).
    sim: what a simulated engine simulates (`SimConfig`; None with device "sim": defaults).
    attention: "auto" (FlashInfer on CUDA when installed, else torch), "torch", "flashinfer".
    block_size: tokens per KV block.
    kv_cache_bytes: memory budget of the KV cache (sets the number of blocks).
    max_batch_tokens: new tokens per step (prefill chunk budget). max_running: sequences per
    step. latency_step_slack: a step that carries latency work may take at most this share
    longer than that work alone, as the engine's step-time model predicts; throughput work
    (prefill chunks, map-stage decodes) fills only that slack (`step_budget.StepBudget`; None:
    no limit, the request-level baseline's behaviour). "auto": 0.25 on the CPU, 0.5 on CUDA
    and simulated GPUs (from the measured trade-off: on the simulated A6000/A100 0.5 keeps
    Fig. 18's chats at 1.7x the throughput-tuned baseline's per-token latency and its jobs
    ahead, where 0.25 made them slower; docs/design.md, docs/results.md).
    throughput_step_tokens: the limit in tokens used instead while a real engine has no fit of
    its steps yet (its first `step_fit.min_samples` steps; "auto": 64 on the CPU, where a decode
    step at small batch takes ~130 ms and 64 tokens of prefill add about as much again; 512 on
    CUDA, where they add little; None: none). cascade: use shared-prefix
    (cascade) decode for forks. prefix_caching: reuse cached full blocks by hash (automatic
    prefix caching); None: as the scheduler's `automatic_prefix_caching` says, on when that is
    unset too (a runtime refuses an engine and a scheduler that set opposite values).
    num_threads: torch CPU threads (None = torch's default). restart_backoff_s: seconds
    between a failure of the engine loop and the rebuild of its core (doubles while failures
    repeat, up to 30 s).
    gil_switch_interval_s: lowers the interpreter's GIL switch interval (`sys.setswitchinterval`,
    process-wide) to this many seconds when the engine starts (None: leave it). The forward
    pass runs in a worker thread and takes the GIL back after every torch op; with the default
    5 ms, any CPU-bound Python thread in the process (an in-process client, a notebook, a load
    generator) makes each of those waits up to 5 ms: decode measured 30-50x slower, the
    20-60 s stalls of in-process scenario runs. 0.5 ms cuts that ~5x and costs nothing
    measurable when nothing competes (docs/guide.md, "Robustness").
    compile: run the layer through the engine's CPU kernels (`cpu_kernels`: packed matmuls,
    fused norm/residual, rotary + KV write, SwiGLU, paged decode attention; built with the
    system C++ compiler once per machine, ~25 s, cached on disk). None (default): on for CPU
    float32 models with hidden_size >= 256 when the build succeeds (off for tiny models, where
    they change little); True: required (`EngineError` when the device, dtype or build rules
    it out); False: torch ops only (the eager path, also the one on CUDA).
    """

    name: str = "engine0"
    model: str = DEFAULT_MODEL
    random_model: dict[str, Any] | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "auto"
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    max_batch_tokens: int = 2048
    max_running: int = 64
    latency_step_slack: float | str | None = "auto"
    throughput_step_tokens: int | str | None = "auto"
    cascade: bool = True
    prefix_caching: bool | None = None
    num_threads: int | None = None
    restart_backoff_s: float = 1.0
    gil_switch_interval_s: float | None = 0.0005
    compile: bool | None = None
    sim: SimConfig | None = None

    def validate(self) -> EngineConfig:
        """Return self, or raise `InvalidRequestError` naming the bad field."""
        if self.sim is not None and self.device != "sim":
            raise InvalidRequestError(f"sim=... needs device='sim', not {self.device!r}")
        if self.dtype not in _DTYPES:
            raise InvalidRequestError(f"dtype {self.dtype!r}: allowed are {sorted(_DTYPES)}")
        for name in ("block_size", "kv_cache_bytes", "max_batch_tokens", "max_running"):
            if getattr(self, name) <= 0:
                raise InvalidRequestError(f"{name}={getattr(self, name)!r}: must be > 0")
        tst = self.throughput_step_tokens
        if tst is not None and tst != "auto" and (not isinstance(tst, int) or tst <= 0):
            raise InvalidRequestError(
                f"throughput_step_tokens={tst!r}: must be a number of tokens > 0, 'auto' or None"
            )
        slack = self.latency_step_slack
        share = isinstance(slack, (int, float)) and 0 <= slack <= 100
        if slack is not None and slack != "auto" and not share:
            raise InvalidRequestError(
                f"latency_step_slack={slack!r}: must be a share in [0, 100], 'auto' or None "
                "(no limit)"
            )
        if self.gil_switch_interval_s is not None and not 0 < self.gil_switch_interval_s <= 0.1:
            raise InvalidRequestError(
                f"gil_switch_interval_s={self.gil_switch_interval_s!r}: must be in (0, 0.1] s"
            )
        if not 0 <= self.restart_backoff_s <= MAX_RESTART_BACKOFF_S:
            raise InvalidRequestError(
                f"restart_backoff_s={self.restart_backoff_s!r}: must be in "
                f"[0, {MAX_RESTART_BACKOFF_S}]"
            )
        return self


def build_core(config: EngineConfig) -> EngineCore:
    """Load the model and allocate the KV cache (blocking; seconds). Raises `EngineError` for
    a missing model and `CapacityError` when the budget holds no block."""
    config.validate()
    if config.device == "sim":
        return _build_sim_core(config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    loaded = (
        random_model(config.random_model, seed=config.seed)
        if config.random_model is not None
        else load_model(config.model)
    )
    device = torch.device(config.device)
    dtype = _DTYPES[config.dtype]
    cfg = loaded.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    kernels = _use_kernels(config, device, dtype, cfg)
    backend = make_backend(
        config.attention,
        num_heads=heads,
        num_kv_heads=int(cfg.num_key_value_heads or heads),
        head_dim=head_dim,
        device=device,
        dtype=dtype,
        cpu_kernels=kernels,
    )
    runner = LlamaRunner(
        loaded,
        device,
        dtype,
        backend,
        kernels=kernels,
        int8=config.dtype == "int8",
    )
    return _core(config, runner, loaded.tokenizer, config.kv_cache_bytes, device, loaded.name)


def _core(
    config: EngineConfig,
    runner: ModelRunner,
    tokenizer: Tokenizer,
    kv_cache_bytes: int,
    device: torch.device | None,
    model_name: str,
) -> EngineCore:
    """The core over `runner` with as many KV blocks as `kv_cache_bytes` hold (`device` None:
    a simulated engine). Raises `CapacityError` when they hold no block."""
    per_block = runner.kv_bytes_per_block(config.block_size)
    num_blocks = kv_cache_bytes // per_block
    if num_blocks < 1:
        raise CapacityError(f"kv_cache_bytes={kv_cache_bytes} holds no block of {per_block} bytes")
    return EngineCore(
        runner,
        tokenizer,
        num_blocks,
        config.block_size,
        max_batch_tokens=config.max_batch_tokens,
        max_running=config.max_running,
        throughput_step_tokens=_throughput_step_tokens(config, device),
        latency_step_slack=_latency_step_slack(config, device),
        step_model=runner.step_model if isinstance(runner, SimRunner) else None,
        cascade=config.cascade,
        prefix_caching=config.prefix_caching is not False,
        name=config.name,
        model_name=model_name,
    )


def _build_sim_core(config: EngineConfig) -> EngineCore:
    """A core over a `SimRunner` (see `engines/sim.py`): the tokenizer of `sim.tokenizer`, as
    many KV blocks as the simulated GPU's KV bytes hold. Raises `InvalidRequestError` for a bad
    `SimConfig`, `CapacityError` when the KV budget holds no block."""
    sim = config.sim or SimConfig()
    tokenizer = load_tokenizer(sim.tokenizer)
    runner = SimRunner(sim, tokenizer, len(tokenizer))  # type: ignore[arg-type]
    kv_bytes = sim.kv_cache_bytes(runner.step_model)
    return _core(config, runner, tokenizer, kv_bytes, None, runner.step_model.model.name)


COMPILE_MIN_HIDDEN = 256
"""Smallest hidden size for which `EngineConfig.compile=None` turns the packed kernels on."""


def _use_kernels(config: EngineConfig, device: torch.device, dtype: torch.dtype, cfg: Any) -> bool:
    """Resolve `config.compile` (see EngineConfig); builds the kernels when they are wanted.
    Raises `EngineError` when they are required (compile=True, dtype="int8") but ruled out."""
    if config.dtype == "int8":
        if device.type != "cpu":
            raise EngineError(
                f"dtype='int8' runs the packed CPU kernels: needs device='cpu', not "
                f"{config.device!r}"
            )
        if not load_kernels():
            raise EngineError(f"dtype='int8': CPU kernels {kernel_status()}")
        return True
    if config.compile is False:
        return False
    fits = device.type == "cpu" and dtype == torch.float32
    if config.compile is None and not (fits and int(cfg.hidden_size) >= COMPILE_MIN_HIDDEN):
        return False
    if not fits:
        raise EngineError(
            f"compile=True: the packed kernels run on cpu/float32, not {device}/{config.dtype}"
        )
    if load_kernels():
        return True
    if config.compile:
        raise EngineError(f"compile=True: CPU kernels {kernel_status()}")
    return False


def _throughput_step_tokens(config: EngineConfig, device: torch.device | None) -> int | None:
    """`config.throughput_step_tokens` with "auto" resolved for `device` (see EngineConfig;
    None: a simulated engine, which simulates a GPU)."""
    tokens = config.throughput_step_tokens
    if isinstance(tokens, str):
        return 512 if device is None or device.type == "cuda" else 64
    return tokens


def _latency_step_slack(config: EngineConfig, device: torch.device | None) -> float | None:
    """`config.latency_step_slack` with "auto" resolved for `device` (see EngineConfig; None:
    a simulated engine, which simulates a GPU)."""
    slack = config.latency_step_slack
    if isinstance(slack, str):
        return 0.5 if device is None or device.type == "cuda" else 0.25
    return None if slack is None else float(slack)


@dataclass(eq=False)
class _Command:
    """A change to the core, applied by the loop between steps: `fn(core)`'s result or error
    goes to `fut`. A command whose caller gave up before it ran is skipped unless `must_run`
    (cancels and frees must happen whoever still waits for them)."""

    fn: Callable[[EngineCore], object]
    fut: asyncio.Future[object]
    must_run: bool = False


class Engine(TokenizerMethods):
    """One model, its KV cache and its contexts, serving fills and generates concurrently.

    Create with `await Engine.start(config)`; stop with `await engine.close()`. Attributes:
    `healthy` (False while the loop is being rebuilt after a failure), `restarts`,
    `last_error`; `add_listener(fn)` calls `fn(engine)` whenever `healthy` changes. Errors:
    `ContextNotFoundError` (unknown or freed context), `InvalidRequestError` (bad arguments),
    `CapacityError` (a request that can never fit), `SamplingError` (one generation's sampling
    failed), `EngineDiedError` (the loop failed under the request, or its context was lost in
    the restart), `EngineError` (engine closed).
    """

    def __init__(self, core: EngineCore, config: EngineConfig) -> None:
        self.config = config
        self.name = config.name
        self.model_name = core.stats.model
        self.aliases: tuple[str, ...] = (config.model,) if config.random_model is None else ()
        self.tokenizer = core.tokenizer
        self.healthy = True
        self.restarts = 0
        self.last_error = ""
        self._core = core
        self._commands: deque[_Command] = deque()
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._frees: set[asyncio.Task[None]] = set()
        self._lost: OrderedDict[str, None] = OrderedDict()
        self._listeners: list[Callable[[EngineClient], None]] = []
        self._wakeup = asyncio.Event()
        self._closed = False
        self._backoff_s = config.restart_backoff_s
        self._last_failure = -CRASH_WINDOW_S
        self._fit_cache: tuple[int, dict[str, float]] = (0, {})
        self._loop_task = asyncio.get_running_loop().create_task(self._supervise())

    @classmethod
    async def start(cls, config: EngineConfig | None = None) -> Engine:
        """Build the engine (model load in a worker thread) and start its step loop."""
        config = (config or EngineConfig()).validate()
        wanted = config.gil_switch_interval_s
        if wanted is not None and sys.getswitchinterval() > wanted:
            sys.setswitchinterval(wanted)
        core = await asyncio.to_thread(build_core, config)
        return cls(core, config)

    @property
    def core(self) -> EngineCore:
        """The current core (replaced on a restart). Read it only; changes go through the
        engine API so that they happen between steps."""
        return self._core

    def add_listener(self, fn: Callable[[EngineClient], None]) -> None:
        """Call `fn(self)` whenever `healthy` changes (e.g. to dispatch when it is back)."""
        self._listeners.append(fn)

    # ---- the step loop and its supervisor ---------------------------------------------------

    async def _supervise(self) -> None:
        while not self._closed:
            try:
                await self._serve()
            except Exception as exc:  # a bug or a device fault: rebuild, never stay dead
                if self._closed:
                    return
                await self._restart(exc)

    async def _serve(self) -> None:
        core = self._core
        while not self._closed:
            self._apply_commands(core)
            if not core.has_work():
                self._wakeup.clear()
                if not self._commands:
                    await self._wakeup.wait()
                continue
            plan = core.schedule()
            if plan is None:
                continue  # every queued request was finished or failed by schedule()
            logits = await self._execute(core, plan)
            if self._closed:
                return
            # The forward pass is over: what arrived meanwhile applies now, so a request
            # cancelled or freed during the step is finished and `finish_step` skips it.
            self._apply_commands(core)
            core.finish_step(plan, logits)
            # Let the owners of finished requests post their next command (a generate after its
            # fill) before the next schedule, so that their contexts are not evicted as idle.
            await asyncio.sleep(0)

    async def _execute(self, core: EngineCore, plan: StepPlan) -> torch.Tensor:
        """The step's forward pass: in a worker thread, timed into the core's step-time fit;
        for a simulated engine, its tokens at once and then a sleep on the process clock until
        the step's predicted duration has passed."""
        runner = core.runner
        if isinstance(runner, SimRunner):
            start = clock.now()
            logits = core.execute(plan)
            delay = runner.step_seconds(plan.layout, len(plan.logit_rows))
            await asyncio.sleep(max(0.0, delay - (clock.now() - start)))
            return logits
        start = time.perf_counter()
        logits = await asyncio.to_thread(_execute_synced, core, plan)
        core.record_step_time(plan, time.perf_counter() - start)
        return logits

    def _apply_commands(self, core: EngineCore) -> None:
        while self._commands:
            cmd = self._commands.popleft()
            if cmd.fut.done() and not cmd.must_run:
                continue  # its caller was cancelled before it could apply
            try:
                result = cmd.fn(core)
            except Exception as exc:  # a bad request (or a bug in one command) fails only it
                if not cmd.fut.done():
                    cmd.fut.set_exception(exc)
                continue
            if not cmd.fut.done():
                cmd.fut.set_result(result)

    async def _restart(self, exc: Exception) -> None:
        self.healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        log.error(
            "engine %r: the step loop failed; failing its requests and rebuilding",
            self.name,
            exc_info=exc,
        )
        self._notify()
        old = self._core
        old.fail_all(
            EngineDiedError(f"engine {self.name!r} failed ({self.last_error}); it is restarting")
        )
        for ctx in old.contexts:
            self._lost[ctx.id] = None
        while len(self._lost) > MAX_LOST_CONTEXTS:
            self._lost.popitem(last=False)
        now = clock.now()
        if now - self._last_failure > CRASH_WINDOW_S:
            self._backoff_s = self.config.restart_backoff_s
        else:
            self._backoff_s = min(max(2 * self._backoff_s, 0.1), MAX_RESTART_BACKOFF_S)
        self._last_failure = now
        delay = self._backoff_s
        while True:
            await asyncio.sleep(delay)
            try:
                self._core = await asyncio.to_thread(old.rebuilt)
                break
            except Exception:
                log.exception("engine %r: rebuilding the core failed; retrying", self.name)
                delay = min(max(2 * delay, 0.1), MAX_RESTART_BACKOFF_S)
        self.restarts += 1
        self.healthy = True
        log.warning("engine %r: serving again (restart %d)", self.name, self.restarts)
        self._notify()

    def _notify(self) -> None:
        for fn in list(self._listeners):
            try:
                fn(self)
            except Exception:
                log.exception("engine %r: a health listener failed", self.name)

    # ---- commands -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"engine {self.name!r} is closed")

    def _post(
        self, fn: Callable[[EngineCore], object], must_run: bool = False
    ) -> asyncio.Future[object]:
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)
        self._commands.append(_Command(fn, fut, must_run))
        self._wakeup.set()
        return fut

    async def _request(
        self, admit: Callable[[EngineCore, FinishCallback], Request | None]
    ) -> object:
        """Admit a request between steps (`admit(core, on_finish)`) and wait for its result.
        Cancelling the wait cancels the request, also between steps."""
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieve)

        def on_finish(result: object, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        admitted = self._post(lambda core: admit(core, on_finish))
        try:
            await admitted
            return await done
        except asyncio.CancelledError:
            if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
                req = admitted.result()
                if isinstance(req, Request):
                    error = EngineError("request cancelled by its caller")
                    self._post(lambda core: core.cancel(req, error), must_run=True)
            raise

    def _check_alive(self, *context_ids: str | None) -> None:
        for cid in context_ids:
            if cid is not None and cid in self._lost:
                raise EngineDiedError(
                    f"context {cid!r} was lost when engine {self.name!r} restarted"
                )

    async def _in_order(
        self, context_id: str, after: list[str], op: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `op` after every earlier operation on `context_id` and on the contexts in
        `after` (a fork waits for its parent) has finished."""
        prev = [self._tails.get(c) for c in [context_id, *after]]
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[context_id] = mine
        try:
            for p in prev:
                if p is not None:
                    await asyncio.shield(p)
            return await op()
        finally:
            mine.set_result(None)
            if self._tails.get(context_id) is mine:
                del self._tails[context_id]

    # ---- the engine API ---------------------------------------------------------------------

    def _starts_empty(self, context_id: str, parent_context_id: str | None) -> bool:
        # A read of the core (safe during a step): ops on this context and its parent are
        # serialized by `_in_order`, so the answer holds until the fill applies.
        contexts = self._core.contexts
        ctx = contexts.find(context_id) or (
            contexts.find(parent_context_id) if parent_context_id else None
        )
        return ctx is None or not ctx.tokens

    async def fill(
        self,
        context_id: str,
        token_ids: list[int] | None = None,
        text: str | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
        parent_tokens: int | None = None,
    ) -> FillResult:
        """Append tokens (or the tokens of `text`) to a context and compute their KV.

        A new `context_id` with `parent_context_id` forks the parent first (its first
        `parent_tokens` tokens; None: all): full blocks are shared, a partial last block
        copied, none of those tokens recomputed. With neither tokens nor text, a fill only
        creates (or forks) the context. Returns a `FillResult`.
        """
        self._check_open()
        if token_ids is not None and text is not None:
            raise InvalidRequestError("fill takes token_ids or text, not both")
        after = [parent_context_id] if parent_context_id else []

        async def op() -> FillResult:
            ids = token_ids
            if text is not None:
                ids = self.tokenize(text, first=self._starts_empty(context_id, parent_context_id))
            result = await self._request(
                lambda core, cb: self._admit_fill(
                    core, context_id, ids, parent_context_id, parent_tokens, priority, cb
                )
            )
            assert isinstance(result, FillResult)
            return result

        return await self._in_order(context_id, after, op)

    def _admit_fill(
        self,
        core: EngineCore,
        context_id: str,
        ids: list[int] | None,
        parent_context_id: str | None,
        parent_tokens: int | None,
        priority: int,
        on_finish: FinishCallback,
    ) -> Request | None:
        self._check_alive(context_id, parent_context_id)
        exists = context_id in core.contexts
        ctx, reused = core.open_context(context_id, parent_context_id, parent_tokens)
        if not ids:
            if exists or parent_context_id:
                result = FillResult(
                    context_id=context_id,
                    appended_tokens=0,
                    computed_tokens=0,
                    reused_tokens=reused,
                    context_len=len(ctx.tokens),
                )
                on_finish(result, None)
                return None
            core.contexts.free(context_id)
            raise InvalidRequestError(
                f"fill of new context {context_id!r} with no tokens: empty prompt"
            )
        try:
            return core.add_fill(ctx, list(ids), priority, reused, on_finish)
        except Exception:
            if not exists:  # a rejected fill leaves no context behind
                core.contexts.free(context_id)
            raise

    async def generate(
        self,
        context_id: str,
        sampling: SamplingParams | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
    ) -> GenerateResult:
        """Generate tokens at the end of a context (forking it from `parent_context_id` first if
        given); the tokens stay in the context, so later fills continue after them. Returns a
        `GenerateResult`."""
        self._check_open()
        sampling = (sampling or SamplingParams()).validate()
        return await self._generate(context_id, sampling, parent_context_id, priority, None)

    async def generate_stream(
        self,
        context_id: str,
        sampling: SamplingParams | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
    ) -> AsyncIterator[TokenDelta]:
        """`generate` as one `TokenDelta` per token; the last carries `finish_reason` and the
        `GenerateResult`. Closing the iterator early cancels the generation."""
        self._check_open()
        sampling = (sampling or SamplingParams()).validate()
        queue: asyncio.Queue[TokenDelta | None] = asyncio.Queue()
        task = asyncio.ensure_future(
            self._generate(context_id, sampling, parent_context_id, priority, queue.put_nowait)
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))
        task.add_done_callback(_retrieve)  # a consumer that stops early never awaits it
        try:
            while (delta := await queue.get()) is not None:
                if delta.finish_reason is not None:
                    # The request finishes in the same step as its last token: its result
                    # is ready now.
                    delta = msgspec.structs.replace(delta, result=await task)
                yield delta
            await task  # re-raises the generation's error, if any
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, EngineError):
                    await task

    async def _generate(
        self,
        context_id: str,
        sampling: SamplingParams,
        parent_context_id: str | None,
        priority: int,
        on_token: Callable[[TokenDelta], None] | None,
    ) -> GenerateResult:
        after = [parent_context_id] if parent_context_id else []
        if sampling.grammar is not None:
            # A first grammar (and the first of all: llguidance's view of the vocabulary,
            # ~0.4 s) is built here, so the loop never stalls every request for it.
            await asyncio.to_thread(self._core.grammars.prepare, sampling.grammar)

        def admit(core: EngineCore, on_finish: FinishCallback) -> Request:
            self._check_alive(context_id, parent_context_id)
            forked = parent_context_id is not None
            if forked:
                ctx, _ = core.open_context(context_id, parent_context_id)
            else:
                ctx = core.contexts.get(context_id)
            try:
                return core.add_generate(ctx, sampling, priority, on_finish, on_token)
            except Exception:
                if forked:
                    core.contexts.free(context_id)
                raise

        async def op() -> GenerateResult:
            result = await self._request(admit)
            assert isinstance(result, GenerateResult)
            return result

        return await self._in_order(context_id, after, op)

    async def free_context(self, context_id: str) -> None:
        """Cancel the context's running work and release its blocks (blocks shared with forks
        live on), both between steps. The free completes even if the caller is cancelled
        meanwhile (a cancelled call must still release its KV). Raises `ContextNotFoundError`
        if the context does not exist; a context lost in a restart is simply forgotten."""
        self._check_open()
        task = asyncio.ensure_future(self._free_in_order(context_id))
        self._frees.add(task)
        task.add_done_callback(self._frees.discard)
        task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every command posted before this call has been applied, frees whose
        callers were cancelled included (e.g. before reading `kv_blocks_used` once an app is
        done). Raises `asyncio.TimeoutError` after `timeout_s` seconds."""
        self._check_open()

        async def settle() -> None:
            while self._frees:
                await asyncio.wait(set(self._frees))
            await self._post(lambda core: None, must_run=True)

        await asyncio.wait_for(settle(), timeout_s)

    async def _free_in_order(self, context_id: str) -> None:
        error = EngineError(f"context {context_id!r} was freed")
        # Stop its work first, so that operations queued on it end now rather than run.
        await self._post(lambda core: self._cancel_on(core, context_id, error), must_run=True)
        await self._in_order(
            context_id, [], lambda: self._post(lambda core: self._free(core, context_id), True)
        )

    def _cancel_on(self, core: EngineCore, context_id: str, error: EngineError) -> None:
        if context_id not in self._lost:
            core.cancel_context(context_id, error)

    def _free(self, core: EngineCore, context_id: str) -> None:
        if context_id in self._lost:  # died with an earlier core: nothing to release
            del self._lost[context_id]
            return
        core.free_context(context_id)

    def stats(self) -> EngineStats:
        """Counters since start, and health (see `EngineStats`)."""
        s = self._core.snapshot()
        s.step_time = self._step_time(self._core)
        s.healthy = self.healthy
        s.restarts = self.restarts
        s.last_error = self.last_error
        return s

    def step_model(self) -> StepPredictor | None:
        """The core's step-time model (`EngineCore.step_model`)."""
        return self._core.step_model()

    def _step_time(self, core: EngineCore) -> dict[str, float]:
        runner = core.runner
        if isinstance(runner, SimRunner):
            return {"simulated_s": runner.simulated_s}  # its steps: EngineStats.steps
        fit = core.step_fit
        # A fit is a least-squares solve over the window: redo it only when the window moved.
        if self._fit_cache[0] != fit.recorded and len(fit) >= fit.min_samples:
            fit.fit()
            self._fit_cache = (fit.recorded, fit.summary())
        return dict(self._fit_cache[1])

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the loop (after the step in flight, waiting at most `timeout_s` seconds);
        queued and running requests fail with `EngineError`."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        done, _ = await asyncio.wait({self._loop_task}, timeout=timeout_s)
        if not done or not self.healthy:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        error = EngineError(f"engine {self.name!r} closed")
        self._core.fail_all(error)
        while self._commands:
            fut = self._commands.popleft().fut
            if not fut.done():
                fut.set_exception(error)


def _execute_synced(core: EngineCore, plan: StepPlan) -> torch.Tensor:
    """`core.execute(plan)`, returning once a GPU has finished it, so the measured step time is
    the device's (the host would wait for it at sampling anyway)."""
    logits = core.execute(plan)
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    return logits


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # An error nobody awaits any more (its caller was cancelled) is expected, not a leak.
    if not fut.cancelled():
        fut.exception()
