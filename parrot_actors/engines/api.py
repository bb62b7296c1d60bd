"""The engine contract: what every engine offers the scheduler and the servers.

One `typing.Protocol`, `EngineClient`, implemented by the local `Engine`, the fake
`EchoEngine` (tests, `--model echo`) and the Ray proxy `RayEngine`; nothing uses an engine
through anything else. The API is the paper's (Parrot, OSDI 2024, §6: Fill, Generate,
FreeContext) plus what serving needs: a streamed generate, health, stats, tokenization and
chat rendering. `tests/test_engine_contract.py` checks every implementation against it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from parrot_actors.engines.step_time import StepPredictor
from parrot_actors.engines.tool_format import hermes_messages, native_messages, renders_tools
from parrot_actors.errors import InvalidRequestError
from parrot_actors.messages import (
    LATENCY_PRIORITY,
    EngineStats,
    FillResult,
    GenerateResult,
    SamplingParams,
    TokenDelta,
)


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the engines use."""

    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        tokenize: bool = ...,
        add_generation_prompt: bool = ...,
    ) -> str: ...


@runtime_checkable
class EngineClient(Protocol):
    """An engine: one model, its KV cache and its contexts.

    Attributes: `name` (unique in a runtime), `model_name` (what it serves), `aliases` (other
    names it answers to, e.g. "default"), `healthy` (False while it is down or restarting).

    Errors (all `EngineError` subclasses): `ContextNotFoundError` for an unknown context,
    `InvalidRequestError` for bad arguments, `CapacityError` for a request that can never fit,
    `SamplingError` when one generation's sampling failed, `EngineDiedError` when the engine
    died under the request (the scheduler may retry it elsewhere).
    """

    name: str
    model_name: str
    aliases: tuple[str, ...]

    @property
    def healthy(self) -> bool:
        """False while the engine is down (restarting); it takes no new work then."""
        ...

    def tokenize(self, text: str, first: bool = False) -> list[int]:
        """Token ids of `text`; special tokens (BOS) only when `first`."""
        ...

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens skipped."""
        ...

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The prompt of a conversation (`{"role", "content"}` dicts; an assistant's may carry
        OpenAI `tool_calls`, a "tool" message is a call's result) ready for the assistant's
        reply, with `tools` (OpenAI function tools) offered to the model (see
        `render_messages`). Raises `InvalidRequestError` when the model's chat template
        refuses it."""
        ...

    def chat_prompt(self, text: str) -> str:
        """`text` as one user message, ready for the reply."""
        ...

    async def fill(
        self,
        context_id: str,
        token_ids: list[int] | None = None,
        text: str | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
        parent_tokens: int | None = None,
    ) -> FillResult:
        """Append tokens (or the tokens of `text`) to a context, forking `parent_context_id`
        first for a new context (its first `parent_tokens` tokens; None: all), and compute
        their KV."""
        ...

    async def generate(
        self,
        context_id: str,
        sampling: SamplingParams | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
    ) -> GenerateResult:
        """Generate at the end of a context (forked first if `parent_context_id`); the tokens
        stay in the context."""
        ...

    def generate_stream(
        self,
        context_id: str,
        sampling: SamplingParams | None = None,
        parent_context_id: str | None = None,
        priority: int = LATENCY_PRIORITY,
    ) -> AsyncIterator[TokenDelta]:
        """`generate` as one `TokenDelta` per token; the last one has `finish_reason` and
        `result` (the `GenerateResult`). Closing the iterator early cancels the generation."""
        ...

    async def free_context(self, context_id: str) -> None:
        """Cancel the context's work and release its KV (shared blocks live on)."""
        ...

    async def flush(self) -> None:
        """Wait until every operation sent so far has taken effect (frees included)."""
        ...

    def step_model(self) -> StepPredictor | None:
        """The model that prices this engine's steps (seconds; `step_time.StepPredictor`), or
        None while it has none (the scheduler then prices tokens at `NOMINAL_TOKEN_S`)."""
        ...

    def stats(self) -> EngineStats:
        """Counters and gauges (a copy)."""
        ...

    def add_listener(self, fn: Callable[[EngineClient], None]) -> None:
        """Call `fn(engine)` whenever `healthy` changes."""
        ...

    async def close(self) -> None:
        """Stop serving; work in flight fails with `EngineError`."""
        ...


class TokenizerMethods:
    """`EngineClient`'s text methods over `self.tokenizer` (a Hugging Face tokenizer), for the
    engines that hold one (`Engine`, and `RayEngine` with its actor's tokenizer)."""

    tokenizer: Tokenizer

    def tokenize(self, text: str, first: bool = False) -> list[int]:
        """Token ids of `text`; special tokens (e.g. BOS) only when `first` (a context's
        first fill), as the tokenizer adds them to a whole prompt."""
        return list(self.tokenizer.encode(text, add_special_tokens=first))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens skipped."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The conversation in the model's chat template, ready for the reply (see
        `render_messages`). Raises `InvalidRequestError` when the template refuses it."""
        return render_messages(self.tokenizer, messages, tools)

    def chat_prompt(self, text: str) -> str:
        """`text` as one user message in the model's chat template, ready for the reply."""
        return self.render_chat([{"role": "user", "content": text}])


def render_messages(
    tokenizer: Tokenizer | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """A conversation as a prompt: the tokenizer's chat template with the generation prompt,
    or, for a model (or fake engine) without one, `<role>content</role>` frames ending in
    `<assistant>`. Tools and tool turns go to a template that renders them in the Hermes
    format itself; for any other they are first written into plain turns
    (`tool_format.hermes_messages`). Raises `InvalidRequestError` when the template refuses
    the conversation."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template and renders_tools(template):
        kwargs: dict[str, Any] = {"tools": tools} if tools else {}
        messages = native_messages(messages)
    else:
        kwargs = {}
        messages = list(hermes_messages(messages, tools))
    if tokenizer is not None and template:
        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except Exception as exc:  # jinja raises its own errors for odd conversations
            raise InvalidRequestError(
                f"messages: the model's chat template refused them: {exc}"
            ) from None
    frames = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
    return frames + "<assistant>"


__all__ = ["EngineClient", "Tokenizer", "TokenizerMethods", "render_messages"]
