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

from parrot_actors.engines.api import EngineClient
from parrot_actors.errors import ParrotError
from parrot_actors.messages import LATENCY_PRIORITY
from parrot_actors.runtime import Runtime
from parrot_actors.server.errors import BadRequestError, NotFoundError


class EngineRouter:
    """Chooses engines for single requests and owns their contexts."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.inflight: dict[str, int] = defaultdict(int)
        self._ids = itertools.count()

    @property
    def engines(self) -> list[EngineClient]:
        """The runtime's engines."""
        return list(self.runtime.engines)

    def models(self) -> list[str]:
        """Names of the served models, sorted."""
        return sorted({e.model_name for e in self.engines})

    def pick(self, model: str) -> EngineClient:
        """The least loaded engine (running + waiting requests + our requests in flight) that
        serves `model` (a model name, an alias such as "default", or an engine name), among
        the healthy ones when any is (a request sent to an engine that is restarting waits for
        its rebuild). Raises `NotFoundError` (404)."""
        cands = [e for e in self.engines if model in (e.model_name, e.name, *e.aliases)]
        if not cands:
            raise NotFoundError(f"model {model!r} is not served; served models: {self.models()}")
        cands = [e for e in cands if e.healthy] or cands

        def load(e: EngineClient) -> tuple[int, str]:
            s = e.stats()
            return (s.running + s.waiting + self.inflight[e.name], e.name)

        return min(cands, key=load)

    @contextlib.asynccontextmanager
    async def context(
        self, engine: EngineClient, prompt: str | list[int]
    ) -> AsyncIterator[tuple[str, int]]:
        """A new context on `engine` filled with `prompt` (text or token ids), at latency
        priority; yields (context id, prompt tokens) and frees the context on exit, also when
        cancelled. Raises the engine's `InvalidRequestError`/`CapacityError` (400)."""
        ctx = f"openai-{next(self._ids)}"
        self.inflight[engine.name] += 1
        try:
            if isinstance(prompt, str):
                fill = await engine.fill(ctx, text=prompt, priority=LATENCY_PRIORITY)
            else:
                fill = await engine.fill(ctx, token_ids=prompt, priority=LATENCY_PRIORITY)
            yield ctx, fill.context_len
        finally:
            self.inflight[engine.name] -= 1
            await _free(engine, ctx)


async def _free(engine: EngineClient, ctx: str) -> None:
    # Shielded: a cancelled handler (client gone) must still release the KV blocks.
    task = asyncio.ensure_future(engine.free_context(ctx))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    with contextlib.suppress(ParrotError):
        await asyncio.shield(task)


def completion_prompt(prompt: str | list[str | int]) -> str | list[int]:
    """The prompt of a completion request: text, one text in a list, or token ids. Raises
    `BadRequestError` for batches, empty lists and mixed lists."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    token_ids = [t for t in prompt if isinstance(t, int) and not isinstance(t, bool)]
    if prompt and len(token_ids) == len(prompt):
        return token_ids
    raise BadRequestError(
        "prompt: give one text, a list of one text, or a non-empty list of token ids "
        "(batched prompts are not supported; send one request each)"
    )
