"""A fake engine with the engine API (`EngineClient`) and no model, for fast tests of the
runtime, the scheduler and the servers, and for `--model echo`.

Tokens are characters: a context is a string, and `generate` returns a deterministic function
of the context text, so tests can check exactly what prompt a call sent. `generate_stream`
streams the same text one character per delta. Every call is logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from parrot_actors.engines.api import EngineClient, render_messages
from parrot_actors.errors import ContextNotFoundError, InvalidRequestError
from parrot_actors.messages import (
    LATENCY_PRIORITY,
    EngineStats,
    FillResult,
    GenerateResult,
    SamplingParams,
    TokenDelta,
)


class EchoEngine:
    """Generates `echo(<last 12 characters of the context>)`, cut to `max_tokens` characters.

    max_len: contexts longer than this many characters fail with `InvalidRequestError`.
    delay_s: seconds each generate takes (lets tests overlap calls; a stream spreads it over its
    characters). log: ("fill" | "generate" | "free", context id, text) in call order. It never
    fails on its own, so `healthy` stays True.
    """

    def __init__(
        self,
        name: str = "echo0",
        model_name: str = "echo",
        max_len: int = 4096,
        delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.model_name = model_name
        self.aliases: tuple[str, ...] = ()
        self.max_len = max_len
        self.delay_s = delay_s
        self.healthy = True
        self.contexts: dict[str, str] = {}
        self.log: list[tuple[str, str, str]] = []
        self._stats = EngineStats(
            name=name, model=model_name, kv_blocks_total=1 << 20, max_model_len=max_len
        )

    def tokenize(self, text: str, first: bool = False) -> list[int]:
        """Characters are tokens."""
        return [ord(c) for c in text]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Tokens are characters."""
        return "".join(chr(t) for t in token_ids)

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """`<role>content</role>` frames ending in `<assistant>` (it has no chat template);
        tools and tool turns in the Hermes format (`tool_format.hermes_messages`)."""
        return render_messages(None, messages, tools)

    def chat_prompt(self, text: str) -> str:
        """`text` wrapped in a minimal chat frame."""
        return self.render_chat([{"role": "user", "content": text}])

    def add_listener(self, fn: Callable[[EngineClient], None]) -> None:
        """Its health never changes, so `fn` is never called."""

    async def fill(
        self,
        context_id: str,
        token_ids: list[int] | None = None,
        text: str | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
        parent_tokens: int | None = None,
    ) -> FillResult:
        """Append `text` (characters are tokens) to a context, forking the parent (its first
        `parent_tokens` characters; None: all) if given.
        Raises `InvalidRequestError` for both token ids and text, ids that are no character, an
        empty new context or one beyond `max_len`; `ContextNotFoundError` for a missing
        parent."""
        if token_ids is not None and text is not None:
            raise InvalidRequestError("fill takes token_ids or text, not both")
        reused = 0
        if parent_context_id is not None:
            if parent_context_id not in self.contexts:
                raise ContextNotFoundError(f"context {parent_context_id!r} does not exist")
            parent = self.contexts[parent_context_id]
            n = len(parent) if parent_tokens is None else parent_tokens
            if not 0 <= n <= len(parent):
                raise InvalidRequestError(
                    f"parent_tokens={parent_tokens!r}: context {parent_context_id!r} holds "
                    f"{len(parent)} tokens"
                )
            self.contexts[context_id] = parent[:n]
            reused = n
            self._stats.reused_tokens += reused
        if token_ids is not None:
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < 0x110000]
            if bad:
                raise InvalidRequestError(f"token ids {bad[:5]} outside [0, 0x110000)")
            text = "".join(chr(t) for t in token_ids)
        text = text or ""
        if context_id not in self.contexts and not text:
            raise InvalidRequestError(f"fill of new context {context_id!r}: empty prompt")
        new = self.contexts.get(context_id, "") + text
        if len(new) > self.max_len:
            raise InvalidRequestError(
                f"context {context_id!r} would hold {len(new)} tokens; "
                f"the model's maximum length is {self.max_len}"
            )
        self.contexts[context_id] = new
        self.log.append(("fill", context_id, text))
        self._stats.prefill_tokens += len(text)
        return FillResult(
            context_id=context_id,
            appended_tokens=len(text),
            computed_tokens=len(text),
            reused_tokens=reused,
            context_len=len(new),
        )

    async def generate(
        self,
        context_id: str,
        sampling: SamplingParams | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
    ) -> GenerateResult:
        """Append and return `echo(<last 12 characters>)` (at most max_tokens characters)."""
        result = self._answer(context_id, sampling, parent_context_id)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self._commit(context_id, result)
        return result

    async def generate_stream(
        self,
        context_id: str,
        sampling: SamplingParams | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
    ) -> AsyncIterator[TokenDelta]:
        """`generate`, one character per delta; the text enters the context as it streams."""
        result = self._answer(context_id, sampling, parent_context_id)
        for i, ch in enumerate(result.text):
            if self.delay_s:
                await asyncio.sleep(self.delay_s / len(result.text))
            if context_id in self.contexts:  # freed meanwhile: nothing to append to
                self.contexts[context_id] += ch
            self._stats.generated_tokens += 1
            last = i == len(result.text) - 1
            yield TokenDelta(
                token_id=ord(ch),
                text=ch,
                finish_reason=result.finish_reason if last else None,
                result=result if last else None,
                logprob=None if result.logprobs is None else result.logprobs[i],
                top_logprobs=None if result.top_logprobs is None else result.top_logprobs[i],
            )

    def _answer(
        self, context_id: str, sampling: SamplingParams | None, parent_context_id: str | None
    ) -> GenerateResult:
        sampling = (sampling or SamplingParams()).validate()
        if sampling.grammar is not None:
            # Echoing would break the constraint; answering anyway would hide that.
            raise InvalidRequestError(
                "grammar: the echo engine has no model to constrain (serve a model for "
                "structured output and tool calls)"
            )
        if parent_context_id is not None:
            if parent_context_id not in self.contexts:
                raise ContextNotFoundError(f"context {parent_context_id!r} does not exist")
            self.contexts[context_id] = self.contexts[parent_context_id]
        if context_id not in self.contexts:
            raise ContextNotFoundError(f"context {context_id!r} does not exist")
        self.log.append(("generate", context_id, ""))
        ctx = self.contexts[context_id]
        out = f"echo({ctx[-12:]})"[: sampling.max_tokens]
        ids = [ord(c) for c in out]
        # The fake "model" is certain of every character: log-probability 0, and no other
        # token is any likelier.
        k = sampling.logprobs
        return GenerateResult(
            token_ids=ids,
            text=out,
            finish_reason="length",
            prompt_tokens=len(ctx),
            completion_tokens=len(out),
            context_len=len(ctx) + len(out),
            logprobs=None if k is None else [0.0] * len(ids),
            top_logprobs=None if k is None else [[(i, 0.0)][:k] for i in ids],
        )

    def _commit(self, context_id: str, result: GenerateResult) -> None:
        if context_id in self.contexts:  # freed meanwhile: nothing to append to
            self.contexts[context_id] += result.text
        self._stats.generated_tokens += len(result.text)

    async def free_context(self, context_id: str) -> None:
        """Forget a context."""
        if context_id not in self.contexts:
            raise ContextNotFoundError(f"context {context_id!r} does not exist")
        self.log.append(("free", context_id, ""))
        del self.contexts[context_id]

    def step_model(self) -> None:
        """None: an echo step costs nothing worth pricing."""
        return None

    def stats(self) -> EngineStats:
        """Counters; kv_blocks_used counts live contexts."""
        self._stats.kv_blocks_used = len(self.contexts)
        self._stats.contexts = len(self.contexts)
        return EngineStats(**{f: getattr(self._stats, f) for f in self._stats.__struct_fields__})

    async def flush(self) -> None:
        """Nothing to wait for: every operation applies at once."""

    async def close(self) -> None:
        """Nothing to release."""
