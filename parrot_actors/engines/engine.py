"""The engine actor: an asyncio shell around `EngineCore`.

The paper's engine API (Parrot, OSDI 2024, §6): `fill`, `generate`, `free_context`. Operations
on one context run in the order they were called; different contexts run concurrently and are
batched together step by step. The forward pass runs in a worker thread so the event loop keeps
accepting requests between and during steps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import torch

from parrot_actors.cuda.backend import make_backend
from parrot_actors.engines.core import EngineCore, Request
from parrot_actors.engines.llama import LlamaRunner
from parrot_actors.engines.model_loader import DEFAULT_MODEL, load_model, random_model
from parrot_actors.errors import EngineError, InvalidRequestError
from parrot_actors.messages import (
    LATENCY_PRIORITY,
    EngineStats,
    FillResult,
    GenerateResult,
    SamplingParams,
    TokenDelta,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfig(msgspec.Struct, kw_only=True):
    """How to build one engine.

    model: "default" (the embedded SmolLM2-135M-Instruct) or a local Hugging Face folder.
    random_model: LlamaConfig fields for a random-weight model (tests, speed benchmarks);
    overrides `model`, weights seeded by `seed`. device: "cpu", "cuda", "cuda:N".
    dtype: "float32" (CPU default), "bfloat16", "float16". attention: "auto" (FlashInfer on
    CUDA when installed, else torch), "torch", "flashinfer". block_size: tokens per KV block.
    kv_cache_bytes: memory budget of the KV cache (sets the number of blocks).
    max_batch_tokens: new tokens per step (prefill chunk budget). max_running: sequences per
    step. cascade: use shared-prefix (cascade) decode for forks. prefix_caching: reuse cached
    full blocks by hash (automatic prefix caching). num_threads: torch CPU threads
    (None = torch's default).
    """

    name: str = "engine0"
    model: str = DEFAULT_MODEL
    random_model: dict | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "auto"
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    max_batch_tokens: int = 2048
    max_running: int = 64
    cascade: bool = True
    prefix_caching: bool = True
    num_threads: int | None = None

    def validate(self) -> EngineConfig:
        """Return self, or raise `InvalidRequestError` naming the bad field."""
        if self.dtype not in _DTYPES:
            raise InvalidRequestError(f"dtype {self.dtype!r}: allowed are {sorted(_DTYPES)}")
        for name in ("block_size", "kv_cache_bytes", "max_batch_tokens", "max_running"):
            if getattr(self, name) <= 0:
                raise InvalidRequestError(f"{name}={getattr(self, name)!r}: must be > 0")
        return self


def build_core(config: EngineConfig) -> EngineCore:
    """Load the model and allocate the KV cache (blocking; seconds). Raises `EngineError` for
    a missing model and `CapacityError` when the budget holds no block."""
    config.validate()
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
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    backend = make_backend(
        config.attention,
        num_heads=heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        device=device,
        dtype=dtype,
    )
    runner = LlamaRunner(loaded, device, dtype, backend)
    num_blocks = config.kv_cache_bytes // runner.kv_bytes_per_block(config.block_size)
    if num_blocks < 1:
        from parrot_actors.errors import CapacityError

        raise CapacityError(
            f"kv_cache_bytes={config.kv_cache_bytes} holds no block of "
            f"{runner.kv_bytes_per_block(config.block_size)} bytes"
        )
    return EngineCore(
        runner,
        loaded.tokenizer,
        num_blocks,
        config.block_size,
        max_batch_tokens=config.max_batch_tokens,
        max_running=config.max_running,
        cascade=config.cascade,
        prefix_caching=config.prefix_caching,
        name=config.name,
        model_name=loaded.name,
    )


class Engine:
    """One model, its KV cache and its contexts, serving fills and generates concurrently.

    Create with `await Engine.start(config)`; stop with `await engine.close()`. Errors:
    `ContextNotFoundError` (unknown or freed context), `InvalidRequestError` (bad arguments),
    `CapacityError` (a request that can never fit), `EngineError` (engine closed or failed).
    """

    def __init__(self, core: EngineCore, config: EngineConfig) -> None:
        self.core = core
        self.config = config
        self.name = config.name
        self.model_name = core.stats.model
        self.aliases = (config.model,) if config.random_model is None else ()
        self.tokenizer = core.tokenizer
        self._tails: dict[str, asyncio.Future] = {}
        self._active: dict[str, set[Request]] = {}
        self._wakeup = asyncio.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        self.request_log: list[tuple[str, str]] = []

    @classmethod
    async def start(cls, config: EngineConfig | None = None) -> Engine:
        """Build the engine (model load in a worker thread) and start its step loop."""
        config = config or EngineConfig()
        core = await asyncio.to_thread(build_core, config)
        return cls(core, config)

    # ---- the step loop ----------------------------------------------------------------------

    async def _loop(self) -> None:
        core = self.core
        try:
            while not self._closed:
                await self._wakeup.wait()
                self._wakeup.clear()
                while core.has_work() and not self._closed:
                    plan = core.schedule()
                    if plan is None:
                        break
                    logits = await asyncio.to_thread(core.execute, plan)
                    core.finish_step(plan, logits)
                    await asyncio.sleep(0)
        except Exception as exc:  # a bug or a device failure: fail every request, loudly
            self._error = exc
            core.fail_all(EngineError(f"engine {self.name!r} failed: {exc!r}"))
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"engine {self.name!r} is closed")
        if self._error is not None:
            raise EngineError(f"engine {self.name!r} failed: {self._error!r}")

    async def _in_order(self, context_id: str, after: list[str], op: Callable[[], Awaitable]):
        """Run `op` after every earlier operation on `context_id` and on the contexts in
        `after` (a fork waits for its parent) has finished."""
        prev = [self._tails.get(c) for c in [context_id, *after]]
        mine = asyncio.get_running_loop().create_future()
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

    def _submit(self, make: Callable[[Callable], Request]) -> tuple[Request, asyncio.Future]:
        fut = asyncio.get_running_loop().create_future()

        def on_finish(result: object, error: BaseException | None) -> None:
            self._active.get(req.ctx.id, set()).discard(req)
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        req = make(on_finish)
        self._active.setdefault(req.ctx.id, set()).add(req)
        self._wakeup.set()
        return req, fut

    # ---- the engine API ---------------------------------------------------------------------

    def tokenize(self, text: str, first: bool = False) -> list[int]:
        """Token ids of `text`; special tokens (e.g. BOS) only when `first` (a context's
        first fill), as the tokenizer adds them to a whole prompt."""
        return list(self.tokenizer.encode(text, add_special_tokens=first))

    def chat_prompt(self, text: str) -> str:
        """`text` as one user message in the model's chat template, ready for the reply."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def detokenize(self, token_ids: list[int]) -> str:
        """Text of `token_ids`, special tokens skipped."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    async def fill(
        self,
        context_id: str,
        token_ids: list[int] | None = None,
        text: str | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
    ) -> FillResult:
        """Append tokens (or the tokens of `text`) to a context and compute their KV.

        A new `context_id` with `parent_context_id` forks the parent first: its full blocks are
        shared, its partial last block copied, none of its tokens recomputed. With neither
        tokens nor text, a fill only creates (or forks) the context. Returns a `FillResult`.
        """
        self._check_open()
        if token_ids is not None and text is not None:
            raise InvalidRequestError("fill takes token_ids or text, not both")
        after = [parent_context_id] if parent_context_id else []

        async def op() -> FillResult:
            self._check_open()
            core = self.core
            exists = context_id in core.contexts
            ctx, reused = core.open_context(context_id, parent_context_id)
            ids = token_ids
            if text is not None:
                ids = self.tokenize(text, first=not ctx.tokens)
            self.request_log.append(("fill", context_id))
            if not ids:
                if exists or parent_context_id:
                    return FillResult(
                        context_id=context_id,
                        appended_tokens=0,
                        computed_tokens=0,
                        reused_tokens=reused,
                        context_len=len(ctx.tokens),
                    )
                core.contexts.free(context_id)
                raise InvalidRequestError(
                    f"fill of new context {context_id!r} with no tokens: empty prompt"
                )
            try:
                req, fut = self._submit(
                    lambda cb: core.add_fill(ctx, list(ids), priority, reused, cb)
                )
            except Exception:
                if not exists and not ctx.tokens:
                    core.contexts.free(context_id)
                raise
            try:
                return await fut
            except asyncio.CancelledError:
                core.cancel(req, EngineError("fill cancelled"))
                raise

        return await self._in_order(context_id, after, op)

    async def generate(
        self,
        context_id: str,
        sampling: SamplingParams | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
        stream: bool = False,
    ) -> GenerateResult | AsyncIterator[TokenDelta]:
        """Generate tokens at the end of a context (forking it from `parent_context_id` first if
        given); the tokens stay in the context, so later fills continue after them.

        Returns a `GenerateResult`, or with `stream=True` an async iterator of `TokenDelta`s
        (closing it early cancels the generation).
        """
        self._check_open()
        sampling = (sampling or SamplingParams()).validate()
        if stream:
            return self._stream(context_id, sampling, parent_context_id, priority)
        return await self._generate(context_id, sampling, parent_context_id, priority, None)

    async def _generate(
        self,
        context_id: str,
        sampling: SamplingParams,
        parent_context_id: str | None,
        priority: int,
        on_token: Callable[[TokenDelta], None] | None,
    ) -> GenerateResult:
        after = [parent_context_id] if parent_context_id else []

        async def op() -> GenerateResult:
            self._check_open()
            core = self.core
            if parent_context_id is not None:
                ctx, _ = core.open_context(context_id, parent_context_id)
            else:
                ctx = core.contexts.get(context_id)
            self.request_log.append(("generate", context_id))
            req, fut = self._submit(
                lambda cb: core.add_generate(ctx, sampling, priority, cb, on_token)
            )
            try:
                return await fut
            except asyncio.CancelledError:
                core.cancel(req, EngineError("generation cancelled"))
                raise

        return await self._in_order(context_id, after, op)

    async def _stream(
        self,
        context_id: str,
        sampling: SamplingParams,
        parent_context_id: str | None,
        priority: int,
    ) -> AsyncIterator[TokenDelta]:
        queue: asyncio.Queue[TokenDelta | None] = asyncio.Queue()
        task = asyncio.ensure_future(
            self._generate(context_id, sampling, parent_context_id, priority, queue.put_nowait)
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (delta := await queue.get()) is not None:
                yield delta
            await task  # re-raises the generation's error, if any
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, EngineError):
                    await task

    async def free_context(self, context_id: str) -> None:
        """Cancel the context's running work and release its blocks (blocks shared with forks
        live on). Raises `ContextNotFoundError` if it does not exist."""
        self._check_open()
        for req in list(self._active.get(context_id, ())):
            self.core.cancel(req, EngineError(f"context {context_id!r} was freed"))
        self.core.contexts.get(context_id)

        async def op() -> None:
            self.request_log.append(("free", context_id))
            self.core.free_context(context_id)
            self._active.pop(context_id, None)
            self._wakeup.set()  # freed blocks may unblock a waiting request

        await self._in_order(context_id, [], op)

    def has_context(self, context_id: str) -> bool:
        """True if the context exists."""
        return context_id in self.core.contexts

    def batch_sizes(self) -> list[int]:
        """Sequences in each step so far, in step order."""
        return list(self.core.batch_sizes)

    def stats(self) -> EngineStats:
        """Counters since start (see `EngineStats`)."""
        return self.core.snapshot()

    async def close(self) -> None:
        """Stop the loop; queued and running requests fail with `EngineError`."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        self.core.fail_all(EngineError(f"engine {self.name!r} closed"))
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._loop_task

