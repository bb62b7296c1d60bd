"""Placing single requests (the OpenAI-compatible API) directly on engines.

These requests are one prompt and one generation each, with no graph around them, so they go
straight to the least loaded healthy engine that serves the requested model, at latency
priority. The engine context lives exactly as long as the request: a client that disconnects
cancels the handler, and the context is freed on the way out (shielded, so the KV is released
even then).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator

from parrot_actors.errors import InvalidRequestError, ParrotError
from parrot_actors.messages import LATENCY_PRIORITY, GenerateResult, TokenDelta
from parrot_actors.server.errors import BadRequestError, NotFoundError


class EngineRouter:
    """Chooses engines for single requests and owns their contexts."""

    def __init__(self, runtime: object) -> None:
        self.runtime = runtime
        self.inflight: dict[str, int] = defaultdict(int)
        self._ids = itertools.count()

    @property
    def engines(self) -> list:
        """The runtime's engines."""
        return list(getattr(self.runtime, "engines", []))

    def models(self) -> list[str]:
        """Names of the served models, sorted."""
        return sorted({e.model_name for e in self.engines})

    def pick(self, model: str) -> object:
        """The least loaded engine (running + waiting requests + our requests in flight) that
        serves `model` (a model name, an alias such as "default", or an engine name), among
        the healthy ones when any is (a request sent to an engine that is restarting waits for
        its rebuild). Raises `NotFoundError` (404)."""
        cands = [
            e for e in self.engines if model in (e.model_name, e.name, *getattr(e, "aliases", ()))
        ]
        if not cands:
            raise NotFoundError(f"model {model!r} is not served; served models: {self.models()}")
        cands = [e for e in cands if getattr(e, "healthy", True)] or cands

        def load(e: object) -> tuple[int, str]:
            s = e.stats()
            return (s.running + s.waiting + self.inflight[e.name], e.name)

        return min(cands, key=load)

    @contextlib.asynccontextmanager
    async def context(
        self, engine: object, prompt: str | list[int]
    ) -> AsyncIterator[tuple[str, int]]:
        """A new context on `engine` filled with `prompt` (text or token ids), at latency
        priority; yields (context id, prompt tokens) and frees the context on exit, also when
        cancelled. Raises the engine's `InvalidRequestError`/`CapacityError` (400)."""
        ctx = f"openai-{next(self._ids)}"
        self.inflight[engine.name] += 1
        try:
            try:
                if isinstance(prompt, str):
                    fill = await engine.fill(ctx, text=prompt, priority=LATENCY_PRIORITY)
                else:
                    fill = await engine.fill(ctx, token_ids=prompt, priority=LATENCY_PRIORITY)
            except (ValueError, TypeError, OverflowError) as exc:
                # An engine that does not check its input (a fake one) must not turn a bad
                # prompt into a 500.
                raise InvalidRequestError(f"the engine refused the prompt: {exc}") from exc
            yield ctx, fill.context_len
        finally:
            self.inflight[engine.name] -= 1
            await _free(engine, ctx)


async def _free(engine: object, ctx: str) -> None:
    # Shielded: a cancelled handler (client gone) must still release the KV blocks.
    task = asyncio.ensure_future(engine.free_context(ctx))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    with contextlib.suppress(ParrotError):
        await asyncio.shield(task)


async def deltas(stream: object) -> AsyncIterator[TokenDelta]:
    """Token deltas of `engine.generate(..., stream=True)`; an engine that cannot stream returns
    a `GenerateResult`, replayed here as one delta per token, the text on the last one."""
    if isinstance(stream, GenerateResult):
        last = len(stream.token_ids) - 1
        for i, tid in enumerate(stream.token_ids):
            yield TokenDelta(
                token_id=tid,
                text=stream.text if i == last else "",
                finish_reason=stream.finish_reason if i == last else None,
            )
        return
    async for delta in stream:
        yield delta


def completion_prompt(prompt: str | list[str | int]) -> str | list[int]:
    """The prompt of a completion request: text, one text in a list, or token ids. Raises
    `BadRequestError` for batches, empty lists and mixed lists."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise BadRequestError(
        "prompt: give one text, a list of one text, or a non-empty list of token ids "
        "(batched prompts are not supported; send one request each)"
    )
