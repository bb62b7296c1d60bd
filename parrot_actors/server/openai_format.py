"""OpenAI response shapes: whole completions and streamed chunks, text and chat, with `n`
choices and `logprobs`, and the chat messages handed to the engine's chat template."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence

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
    TokenLogprob,
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

    def piece(self, delta: TokenDelta, index: int) -> Completion | None:
        """The chunk of one streamed token of choice `index` (None when it adds nothing)."""
        offset = self._offsets.get(index, 0)
        lps = None
        if delta.logprob is not None:
            tops = [delta.top_logprobs] if delta.top_logprobs is not None else None
            lps = self._logprobs([delta.token_id], [delta.logprob], tops, offset)
        self._offsets[index] = offset + len(delta.text)
        if not delta.text and lps is None:
            return None
        choice = CompletionChoice(index=index, text=delta.text, logprobs=lps)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def closing(self, finish: str, index: int) -> Completion:
        """The chunk carrying choice `index`'s finish reason."""
        choice = CompletionChoice(index=index, text="", finish_reason=finish)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage(self, usage: Usage) -> Completion:
        """The usage chunk (`stream_options.include_usage`): no choices."""
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


class ChatFormat:
    """Shapes of /v1/chat/completions. logprobs: the `top_logprobs` count when the request
    asked for `logprobs` (None: none); text: a token id's text."""

    def __init__(self, model: str, logprobs: int | None, text: TokenText) -> None:
        self.model = model
        self.logprobs = logprobs
        self.text = text
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

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

    def whole(self, results: list[GenerateResult], usage: Usage) -> ChatCompletion:
        """The non-streamed answer: one choice per result."""
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=r.text),
                finish_reason=r.finish_reason,
                logprobs=self._logprobs(r),
            )
            for i, r in enumerate(results)
        ]
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def opening(self, n: int) -> list[ChatCompletionChunk]:
        """The first chunk of each choice: the assistant role, no content yet."""
        return [self._chunk(Delta(role="assistant", content=""), i) for i in range(n)]

    def piece(self, delta: TokenDelta, index: int) -> ChatCompletionChunk | None:
        """The chunk of one streamed token of choice `index` (None when it adds nothing)."""
        lps = None
        if self.logprobs is not None and delta.logprob is not None:
            lps = ChatLogprobs(
                content=[self._token(delta.token_id, delta.logprob, delta.top_logprobs)]
            )
        if not delta.text and lps is None:
            return None
        return self._chunk(Delta(content=delta.text), index, lps=lps)

    def closing(self, finish: str, index: int) -> ChatCompletionChunk:
        """The chunk carrying choice `index`'s finish reason."""
        return self._chunk(Delta(), index, finish)

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        """The usage chunk (`stream_options.include_usage`): no choices."""
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


def message_text(msg: ChatMessage) -> str:
    """A message's content as text (text parts joined)."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    return "".join(part.text for part in msg.content)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI chat messages as `{"role", "content"}` dicts for `EngineClient.render_chat`
    (a "developer" message is the system's)."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": message_text(m)}
        for m in messages
    ]
