"""OpenAI response shapes: whole completions and streamed chunks, text and chat, and the chat
prompt rendering."""

from __future__ import annotations

import time
import uuid

from parrot_actors.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    CompletionChoice,
    Delta,
    Usage,
)


class TextFormat:
    """Shapes of /v1/completions (one id and timestamp per request)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _make(self, text: str, finish: str | None, usage: Usage | None = None) -> Completion:
        choice = CompletionChoice(index=0, text=text, finish_reason=finish)
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        )

    def whole(self, text: str, finish: str, usage: Usage) -> Completion:
        """The non-streamed answer."""
        return self._make(text, finish, usage)

    def opening(self) -> list[Completion]:
        """Chunks before the first token (none for text)."""
        return []

    def piece(self, text: str) -> Completion:
        """A chunk adding `text`."""
        return self._make(text, None)

    def closing(self, finish: str) -> Completion:
        """The chunk carrying the finish reason."""
        return self._make("", finish)

    def usage(self, usage: Usage) -> Completion:
        """The usage chunk (`stream_options.include_usage`): no choices."""
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )


class ChatFormat:
    """Shapes of /v1/chat/completions."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _chunk(self, delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish)
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )

    def whole(self, text: str, finish: str, usage: Usage) -> ChatCompletion:
        """The non-streamed answer."""
        choice = ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=finish)
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        )

    def opening(self) -> list[ChatCompletionChunk]:
        """The first chunk: the assistant role, no content yet."""
        return [self._chunk(Delta(role="assistant", content=""))]

    def piece(self, text: str) -> ChatCompletionChunk:
        """A chunk adding `text`."""
        return self._chunk(Delta(content=text))

    def closing(self, finish: str) -> ChatCompletionChunk:
        """The chunk carrying the finish reason."""
        return self._chunk(Delta(), finish)

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
