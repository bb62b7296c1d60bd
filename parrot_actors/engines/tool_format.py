"""Tool calling in the Hermes format: how tools and tool turns are written into a prompt, the
grammar that keeps a model's calls valid, and the parser that turns its output back into calls.

The format (NousResearch Hermes 2 Pro function calling, also Qwen2.5's): the system message
lists the tools as JSON inside `<tools></tools>`; the model calls one by writing
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; a result comes back as
`<tool_response>\\n...\\n</tool_response>` in a user turn. A chat template that renders tools
itself in this format (one that mentions `<tool_call>`) gets the tools and the structured
messages as transformers' `apply_chat_template(tools=...)` takes them; any other template gets
the conversation rewritten here into plain system/user/assistant turns.

Calls are kept valid by constrained decoding (llguidance Lark grammars,
github.com/guidance-ai/llguidance docs/syntax.md, "Tool calling"): "required" and a named tool
force a call from the first token; "auto" leaves text free until the model writes
`<tool_call>` and constrains the call from there on.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from parrot_actors.messages import Grammar

OPEN = "<tool_call>"
CLOSE = "</tool_call>"

_SYSTEM = """# Tools

You may call one or more functions to help with the user's request. The functions are \
described by their JSON signatures inside <tools></tools> tags:
<tools>
{tools}
</tools>

To call a function, write a JSON object with its name and arguments inside \
<tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-json-object>}}
</tool_call>"""


def renders_tools(chat_template: str | None) -> bool:
    """Whether a chat template writes tools and tool turns in this format itself (it takes
    `tools` and mentions `<tool_call>`): then it gets them unchanged."""
    return bool(chat_template) and "tools" in chat_template and OPEN in chat_template  # type: ignore[operator]


def _call_text(call: dict[str, Any]) -> str:
    """A past call as the model wrote it: compact JSON, name first (`tool_grammar` fixes
    that form), so the rendered history repeats the generated text and a kept context
    (a session's previous turn) forks past it instead of recomputing it."""
    fn = call.get("function", {})
    args = fn.get("arguments", "{}")
    try:
        parsed: Any = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        parsed = args  # not JSON: kept as a JSON string
    compact = (",", ":")
    name = json.dumps(fn.get("name", ""), ensure_ascii=False)
    body = json.dumps(parsed, separators=compact, ensure_ascii=False)
    return f'{OPEN}\n{{"name":{name},"arguments":{body}}}\n{CLOSE}'


def hermes_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
) -> list[dict[str, str]]:
    """The conversation as plain `{"role", "content"}` turns for a template that knows no
    tools: the tools (OpenAI `{"type": "function", "function": {...}}` dicts) appended to the
    system message (one is added first when there is none), an assistant's `tool_calls` as
    `<tool_call>` blocks after its text, and consecutive "tool" messages as one user turn of
    `<tool_response>` blocks."""
    out: list[dict[str, str]] = []
    rest = list(messages)
    if tools:
        listing = "\n".join(json.dumps(t) for t in tools)
        block = _SYSTEM.format(tools=listing)
        if rest and rest[0].get("role") == "system":
            first = rest.pop(0)
            lead = str(first.get("content") or "")
            out.append({"role": "system", "content": f"{lead}\n\n{block}" if lead else block})
        else:
            out.append({"role": "system", "content": block})
    for msg in rest:
        role = str(msg.get("role"))
        content = str(msg.get("content") or "")
        if role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool_turn") == "1":
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_turn": "1"})
            continue
        calls = msg.get("tool_calls") or []
        if calls:
            texts = [content] if content else []
            content = "\n".join(texts + [_call_text(c) for c in calls])
        out.append({"role": role, "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def native_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools itself: tool-call arguments as objects
    (transformers' convention; templates write them with `tojson`) where they parse."""
    out = []
    for msg in messages:
        calls = msg.get("tool_calls")
        if not calls:
            out.append(dict(msg))
            continue
        fixed = []
        for c in calls:
            fn = dict(c.get("function", {}))
            try:
                fn["arguments"] = json.loads(fn.get("arguments", "{}"))
            except (TypeError, ValueError):
                pass
            fixed.append({**c, "function": fn})
        out.append({**msg, "tool_calls": fixed})
    return out


def closed(schema: Any) -> Any:
    """`schema` with every object schema that lists `properties` and says nothing of
    `additionalProperties` closed to them (a copy): a call then carries only the arguments its
    tool declares, so a Python tool never gets a keyword it does not take (what OpenAI's
    `strict` tools require of their schemas)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = (
                {k: closed(v) for k, v in value.items()} if isinstance(value, dict) else value
            )
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not"):
            out[key] = closed(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one call's body, name first (llguidance keeps property order)."""
    params = closed(fn.get("parameters") or {"type": "object", "properties": {}})
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        # Fixed separators: small models pad flexible JSON with blanks until max_tokens.
        "x-guidance": {"whitespace_flexible": False},
    }


@dataclass(frozen=True)
class Named:
    """A `tool_choice` naming the one tool the answer must call."""

    name: str


ToolChoice = str | Named
"""`"none"`, `"auto"`, `"required"`, or `Named(tool)`."""


def tool_grammar(
    tools: Sequence[dict[str, Any]], choice: ToolChoice, parallel: bool = True
) -> Grammar | None:
    """The constraint for `tool_choice` = `choice` over `tools` (OpenAI function tools):
    "none" -> None; "auto" -> free text in which every `<tool_call>` block is a valid call;
    "required" -> one call (or several, one per line, when `parallel`) and nothing else;
    `Named(tool)` -> exactly one call of that tool. Raises `KeyError` for a name no tool has
    and `ValueError` for any other choice."""
    if choice == "none":
        return None
    fns = [t["function"] for t in tools]
    if isinstance(choice, Named):
        fns = [f for f in fns if f["name"] == choice.name][:1]
        if not fns:
            raise KeyError(choice.name)
    elif choice not in ("auto", "required"):
        raise ValueError(f"tool choice {choice!r}: none, auto, required or Named(tool)")
    bodies = [f"fn_{i}: %json {json.dumps(_call_schema(f))}" for i, f in enumerate(fns)]
    body = "body: " + " | ".join(f"fn_{i}" for i in range(len(fns)))
    if choice == "auto":
        calls = "call*" if parallel else "call?"
        rules = [
            f"start: {calls} TEXT",
            "TEXT: /(.|\\n)*/",
            f"head[lazy]: TEXT {json.dumps(OPEN)}",
            f'call: head "\\n" body "\\n{CLOSE}"',
        ]
    else:
        many = parallel and not isinstance(choice, Named)
        rules = [
            'start: call ("\\n" call)*' if many else "start: call",
            f'call: "{OPEN}\\n" body "\\n{CLOSE}"',
        ]
    return Grammar(lark="\n".join([*rules, body, *bodies]) + "\n")


@dataclass
class ParsedCall:
    """A tool call found in an output: `arguments` is its JSON text as the model wrote it
    (incomplete when the output ended inside the call)."""

    id: str
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass
class CallStart:
    """Event: call `index` began (its id and the function's name are known)."""

    index: int
    id: str
    name: str


@dataclass
class ArgumentsPiece:
    """Event: more of call `index`'s arguments JSON text."""

    index: int
    text: str


@dataclass
class ContentPiece:
    """Event: more of the message's text (outside calls)."""

    text: str


Event = CallStart | ArgumentsPiece | ContentPiece

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    """A fresh tool-call id, `call_` and 24 hex digits (OpenAI's shape)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallParser:
    """Splits output text in this format into content and calls, as it streams: `feed` takes
    each new piece and returns the events it completes; `finish` flushes what is left. Text
    that may still become `<tool_call>` is held back, as are the last `}` of a call (the
    close of its `{"name", "arguments"}` object) and whitespace that only borders calls, so
    a streamed answer's pieces join to exactly the whole answer's content and arguments."""

    new_id: Callable[[], str] = new_call_id
    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    _buf: str = ""
    _state: str = "text"  # text | head | args
    _fresh: bool = True  # no content since the start or the last call
    _sent: int = 0  # characters of the open call's arguments already sent

    def feed(self, text: str) -> list[Event]:
        """Events completed by `text`, the output's next piece."""
        self._buf += text
        events: list[Event] = []
        while True:
            before = (self._state, len(self._buf))
            if self._state == "text":
                self._text(events, final=False)
            elif self._state == "head":
                self._head(events)
            else:
                self._args(events)
            if (self._state, len(self._buf)) == before:
                return events

    def finish(self) -> list[Event]:
        """Events for what is left at the end of the output: held text becomes content; an
        unfinished call keeps the arguments written so far; an unfinished `<tool_call>` head
        becomes content."""
        events: list[Event] = []
        if self._state == "text":
            self._text(events, final=True)
        elif self._state == "head":
            self._segment(events, OPEN + self._buf)
        else:
            self._emit_args(events, self._buf[self._sent :])
        self._buf = ""
        self._state = "text"
        return events

    def _segment(self, events: list[Event], text: str) -> None:
        """Content outside calls: whitespace that borders a call is dropped, and text after
        a call goes on a new line of the content."""
        if self._fresh:
            text = text.lstrip()
        if not text:
            return
        if self._fresh and self.content:
            text = "\n" + text
        self._fresh = False
        self.content += text
        events.append(ContentPiece(text))

    def _emit_args(self, events: list[Event], text: str) -> None:
        if text:
            self.calls[-1].arguments += text
            events.append(ArgumentsPiece(len(self.calls) - 1, text))

    def _text(self, events: list[Event], final: bool) -> None:
        at = self._buf.find(OPEN)
        if at >= 0 or final:
            end = at if at >= 0 else len(self._buf)
            self._segment(events, self._buf[:end].rstrip())
            self._buf = self._buf[end + len(OPEN) :] if at >= 0 else ""
            self._state = "head" if at >= 0 else "text"
            return
        # Hold back a tail that may begin `<tool_call>`, and trailing whitespace (it may
        # only separate text from a call).
        keep = next(
            (
                n
                for n in range(min(len(OPEN) - 1, len(self._buf)), 0, -1)
                if OPEN.startswith(self._buf[-n:])
            ),
            0,
        )
        ready = self._buf[: len(self._buf) - keep].rstrip()
        if ready:
            self._segment(events, ready)
            self._buf = self._buf[len(ready) :]

    def _head(self, events: list[Event]) -> None:
        match = _HEAD.match(self._buf)
        if match is None:
            end = self._buf.find(CLOSE)
            if end >= 0:  # not a call after all (unconstrained output): plain text
                self._segment(events, OPEN + self._buf[: end + len(CLOSE)])
                self._buf = self._buf[end + len(CLOSE) :]
                self._state = "text"
            return
        name = json.loads(f'"{match.group(1)}"')
        call = ParsedCall(id=self.new_id(), name=name)
        self.calls.append(call)
        events.append(CallStart(len(self.calls) - 1, call.id, name))
        self._buf = self._buf[match.end() :]
        self._state = "args"
        self._sent = 0
        self._fresh = True

    def _args(self, events: list[Event]) -> None:
        end = self._buf.find(CLOSE)
        if end >= 0:
            body = self._buf[:end].rstrip()
            if body.endswith("}"):
                body = body[:-1].rstrip()
            self._emit_args(events, body[self._sent :])
            self.calls[-1].complete = True
            self._buf = self._buf[end + len(CLOSE) :]
            self._state = "text"
            return
        last = self._buf.rfind("}")
        safe = last if last >= 0 else len(self._buf)
        if safe > self._sent:
            self._emit_args(events, self._buf[self._sent : safe])
            self._sent = safe


def parse_tool_calls(text: str) -> ToolCallParser:
    """The whole output `text` parsed at once (the same events as streaming it)."""
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    return parser
