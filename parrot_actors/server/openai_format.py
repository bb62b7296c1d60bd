"""OpenAI response shapes: whole completions and streamed chunks, text and chat, with `n`
choices, `logprobs` and tool calls, and the chat messages handed to the engine's chat
template."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from parrot_actors.engines.tool_format import (
    CallStart,
    ContentPiece,
    Event,
    ToolCallParser,
    parse_tool_calls,
)
from parrot_actors.messages import GenerateResult, TokenDelta
from parrot_actors.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    FunctionCall,
    FunctionDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)

TokenText = Callable[[int], str]
"""The text of one token id (the engine's `detokenize([id])`)."""


def _top(
    top: Sequence[tuple[int, float]] | None, text: TokenText, k: int
) -> list[tuple[str, float]]:
    return [(text(t), lp) for t, lp in (top or [])[:k]]


class TextFormat:
    """Shapes of /v1/completions (one id and timestamp per request). logprobs: the `logprobs`
    the request asked for (None: none); text: a token id's text."""

    def __init__(self, model: str, logprobs: int | None, text: TokenText) -> None:
        self.model = model
        self.logprobs = logprobs
        self.text = text
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}

    def _logprobs(
        self,
        ids: Sequence[int],
        lps: Sequence[float] | None,
        tops: Sequence[Sequence[tuple[int, float]]] | None,
        offset: int,
    ) -> CompletionLogprobs | None:
        if self.logprobs is None or lps is None:
            return None
        k = self.logprobs
        tokens = [self.text(t) for t in ids]
        offsets = []
        for tok in tokens:
            offsets.append(offset)
            offset += len(tok)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=list(lps),
            top_logprobs=[dict(_top(t, self.text, k)) for t in tops] if tops else None,
            text_offset=offsets,
        )

    def whole(self, results: list[GenerateResult], usage: Usage) -> Completion:
        """The non-streamed answer: one choice per result."""
        choices = [
            CompletionChoice(
                index=i,
                text=r.text,
                finish_reason=r.finish_reason,
                logprobs=self._logprobs(r.token_ids, r.logprobs, r.top_logprobs, 0),
            )
            for i, r in enumerate(results)
        ]
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def opening(self, n: int) -> list[Completion]:
        """Chunks before the first token (none for text)."""
        return []

    def piece(self, delta: TokenDelta, index: int) -> list[Completion]:
        """The chunks of one streamed token of choice `index` (none when it adds nothing)."""
        offset = self._offsets.get(index, 0)
        lps = None
        if delta.logprob is not None:
            tops = [delta.top_logprobs] if delta.top_logprobs is not None else None
            lps = self._logprobs([delta.token_id], [delta.logprob], tops, offset)
        self._offsets[index] = offset + len(delta.text)
        if not delta.text and lps is None:
            return []
        choice = CompletionChoice(index=index, text=delta.text, logprobs=lps)
        return [Completion(id=self.id, created=self.created, model=self.model, choices=[choice])]

    def closing(self, finish: str, index: int) -> list[Completion]:
        """The chunk carrying choice `index`'s finish reason."""
        choice = CompletionChoice(index=index, text="", finish_reason=finish)
        return [Completion(id=self.id, created=self.created, model=self.model, choices=[choice])]

    def usage(self, usage: Usage) -> Completion:
        """The usage chunk (`stream_options.include_usage`): no choices."""
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


class ChatFormat:
    """Shapes of /v1/chat/completions. logprobs: the `top_logprobs` count when the request
    asked for `logprobs` (None: none); text: a token id's text; tools: whether outputs hold
    tool calls in the Hermes format (`engines.tool_format`), to be answered as `tool_calls`
    (with finish reason "tool_calls" when the model stopped after calling)."""

    def __init__(
        self, model: str, logprobs: int | None, text: TokenText, tools: bool = False
    ) -> None:
        self.model = model
        self.logprobs = logprobs
        self.text = text
        self.tools = tools
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self._parsers: dict[int, ToolCallParser] = {}

    def _token(
        self, token: int, lp: float, top: Sequence[tuple[int, float]] | None
    ) -> TokenLogprob:
        text = self.text(token)
        k = self.logprobs or 0
        return TokenLogprob(
            token=text,
            logprob=lp,
            bytes=list(text.encode()),
            top_logprobs=[
                TopLogprob(token=t, logprob=v, bytes=list(t.encode()))
                for t, v in _top(top, self.text, k)
            ],
        )

    def _logprobs(self, r: GenerateResult) -> ChatLogprobs | None:
        if self.logprobs is None or r.logprobs is None:
            return None
        tops = r.top_logprobs or [[] for _ in r.token_ids]
        return ChatLogprobs(
            content=[self._token(t, lp, top) for t, lp, top in zip(r.token_ids, r.logprobs, tops)]
        )

    def _chunk(
        self, delta: Delta, index: int, finish: str | None = None, lps: ChatLogprobs | None = None
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=lps)
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )

    def _message(self, r: GenerateResult) -> tuple[AssistantMessage, str | None]:
        if not self.tools:
            return AssistantMessage(content=r.text), r.finish_reason
        parsed = parse_tool_calls(r.text)
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in parsed.calls
        ]
        message = AssistantMessage(content=parsed.content or None, tool_calls=calls or None)
        if not calls:
            message.content = parsed.content
        return message, _finish(r.finish_reason, bool(calls))

    def whole(self, results: list[GenerateResult], usage: Usage) -> ChatCompletion:
        """The non-streamed answer: one choice per result."""
        choices = []
        for i, r in enumerate(results):
            message, finish = self._message(r)
            choices.append(
                ChatChoice(
                    index=i, message=message, finish_reason=finish, logprobs=self._logprobs(r)
                )
            )
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def opening(self, n: int) -> list[ChatCompletionChunk]:
        """The first chunk of each choice: the assistant role, no content yet."""
        return [self._chunk(Delta(role="assistant", content=""), i) for i in range(n)]

    def piece(self, delta: TokenDelta, index: int) -> list[ChatCompletionChunk]:
        """The chunks of one streamed token of choice `index` (none when it adds nothing;
        with tools, one per content piece or tool-call piece it completes)."""
        lps = None
        if self.logprobs is not None and delta.logprob is not None:
            lps = ChatLogprobs(
                content=[self._token(delta.token_id, delta.logprob, delta.top_logprobs)]
            )
        if self.tools:
            parser = self._parsers.setdefault(index, ToolCallParser())
            chunks = self._events(parser.feed(delta.text), index)
            if lps is not None:
                if chunks:
                    chunks[0].choices[0].logprobs = lps
                else:
                    chunks = [self._chunk(Delta(), index, lps=lps)]
            return chunks
        if not delta.text and lps is None:
            return []
        return [self._chunk(Delta(content=delta.text), index, lps=lps)]

    def _events(self, events: list[Event], index: int) -> list[ChatCompletionChunk]:
        chunks = []
        for event in events:
            if isinstance(event, ContentPiece):
                delta = Delta(content=event.text)
            elif isinstance(event, CallStart):
                fn = FunctionDelta(name=event.name, arguments="")
                call = ToolCallDelta(index=event.index, id=event.id, type="function", function=fn)
                delta = Delta(tool_calls=[call])
            else:
                fn = FunctionDelta(arguments=event.text)
                delta = Delta(tool_calls=[ToolCallDelta(index=event.index, function=fn)])
            chunks.append(self._chunk(delta, index))
        return chunks

    def closing(self, finish: str, index: int) -> list[ChatCompletionChunk]:
        """The chunks that end choice `index`: what its tool-call parser held back, then
        the finish reason ("tool_calls" when it stopped after calling)."""
        parser = self._parsers.pop(index, None)
        if parser is None:
            return [self._chunk(Delta(), index, _finish(finish, False))]
        chunks = self._events(parser.finish(), index)
        return [*chunks, self._chunk(Delta(), index, _finish(finish, bool(parser.calls)))]

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        """The usage chunk (`stream_options.include_usage`): no choices."""
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


def _finish(reason: str | None, called: bool) -> str | None:
    """OpenAI's finish reason: "tool_calls" for an output that stopped after calling."""
    return "tool_calls" if called and reason == "stop" else reason


def message_text(msg: ChatMessage) -> str:
    """A message's content as text (text parts joined)."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    return "".join(part.text for part in msg.content)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI chat messages as `{"role", "content"}` dicts for `EngineClient.render_chat`
    (a "developer" message is the system's), with an assistant's `tool_calls` and a tool
    message's `tool_call_id` as OpenAI dicts."""
    out = []
    for m in messages:
        msg: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": message_text(m),
        }
        if m.tool_calls:
            msg["tool_calls"] = [msgspec.to_builtins(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out
