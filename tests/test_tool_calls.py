"""OpenAI tool calling (issue 14): the Hermes format's rendering, grammar and parser as exact
units, then `tools` / `tool_choice` through the real `openai` client on the tiny random model,
whose calls are valid only because they are constrained."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from parrot_actors.engines.api import render_messages
from parrot_actors.engines.grammar import compile_grammar
from parrot_actors.engines.tool_format import (
    ArgumentsPiece,
    CallStart,
    ContentPiece,
    Named,
    ToolCallParser,
    closed,
    hermes_messages,
    parse_tool_calls,
    tool_grammar,
)
from parrot_actors.server import BackgroundServer
from tests.conftest import tiny_config

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
SCHEMAS = {"get_weather": closed(WEATHER), "add": closed(ADD)}

# ---- the format, exactly -----------------------------------------------------------------------

CALL = '<tool_call>\n{"name":"add","arguments":{"a":1,"b":{"c":"}"}}}\n</tool_call>'


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("Plain answer.", "Plain answer.", []),
        ("  Sure.\n" + CALL + "\n", "Sure.", [("add", '{"a":1,"b":{"c":"}"}}', True)]),
        (CALL + "\n" + CALL, "", [("add", '{"a":1,"b":{"c":"}"}}', True)] * 2),
        ("A " + CALL + " then B", "A\nthen B", [("add", '{"a":1,"b":{"c":"}"}}', True)]),
        ("x <tool and <b>", "x <tool and <b>", []),
        ('<tool_call>\n{"name":"add","arguments":{"a":1', "", [("add", '{"a":1', False)]),
        ("<tool_call>\n{oops", "<tool_call>\n{oops", []),
    ],
)
def test_parser_splits_content_and_calls_the_same_whole_or_streamed(text, content, calls):
    whole = parse_tool_calls(text)
    assert whole.content == content
    assert [(c.name, c.arguments, c.complete) for c in whole.calls] == calls
    for size in (1, 2, 5, 11):
        parser = ToolCallParser()
        events = []
        for i in range(0, len(text), size):
            events += parser.feed(text[i : i + size])
        events += parser.finish()
        assert "".join(e.text for e in events if isinstance(e, ContentPiece)) == content
        starts = [(e.index, e.name) for e in events if isinstance(e, CallStart)]
        assert starts == [(i, c[0]) for i, c in enumerate(calls)]
        args = ["" for _ in calls]
        for e in events:
            if isinstance(e, ArgumentsPiece):
                args[e.index] += e.text
        assert args == [c[1] for c in calls]


def test_hermes_rendering_of_tools_calls_and_results():
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "add", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "tool", "tool_call_id": "c2", "content": "0"},
    ]
    out = hermes_messages(history, TOOLS[1:])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools\n")
    assert json.dumps(TOOLS[1]) in out[0]["content"]
    assert out[2]["content"] == (
        '<tool_call>\n{"name":"add","arguments":{"a":1}}\n</tool_call>\n'
        '<tool_call>\n{"name":"add","arguments":{}}\n</tool_call>'
    )
    assert out[3]["content"] == (
        "<tool_response>\n3\n</tool_response>\n<tool_response>\n0\n</tool_response>"
    )
    # Without tools nothing is added; without a template: role frames.
    assert hermes_messages(history[:2], None) == history[:2]
    assert render_messages(None, history[1:2], None) == "<user>Weather?</user><assistant>"


def test_a_template_that_renders_tools_gets_them_and_the_calls_as_objects():
    from parrot_actors.engines.model_loader import load_tokenizer

    tokenizer = load_tokenizer()
    tokenizer.chat_template = (
        "{% for t in tools %}{{ t.function.name }};{% endfor %}"
        "{% for m in messages %}[{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.arguments | tojson }}"
        "</tool_call>{% endfor %}]{% endfor %}"
    )
    history = [
        {"role": "user", "content": "Sum?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a":1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "1"},
    ]
    assert render_messages(tokenizer, history, TOOLS) == (
        'get_weather;add;[user:Sum?][assistant:<tool_call>{"a": 1}</tool_call>][tool:1]'
    )


def test_closed_schemas_and_grammars_of_each_choice():
    assert closed({"type": "object", "properties": {"x": {"type": "array", "items": ADD}}}) == {
        "type": "object",
        "properties": {"x": {"type": "array", "items": {**ADD, "additionalProperties": False}}},
        "additionalProperties": False,
    }
    assert closed({"type": "object", "additionalProperties": True}) == {
        "type": "object",
        "additionalProperties": True,
    }
    assert tool_grammar(TOOLS, "none") is None
    tools = [*TOOLS, {"type": "function", "function": {"name": "auto", "parameters": ADD}}]
    for choice in ("auto", "required", Named("add"), Named("auto")):
        for parallel in (True, False):
            grammar = tool_grammar(tools, choice, parallel)
            assert grammar is not None and compile_grammar(grammar)
    # A tool named like a mode is still the named tool: one call, no free text.
    named_auto = tool_grammar(tools, Named("auto")).lark or ""
    assert "TEXT" not in named_auto and "get_weather" not in named_auto
    assert "get_weather" not in (tool_grammar(TOOLS, Named("add")).lark or "")
    with pytest.raises(KeyError):
        tool_grammar(TOOLS, Named("nope"))
    with pytest.raises(ValueError):
        tool_grammar(TOOLS, "add")


# ---- through the OpenAI API on the tiny model ----------------------------------------------


def _valid(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    assert call.id.startswith("call_") and call.type == "function"
    return args


def _chat(client, **kwargs):
    kwargs.setdefault("messages", [{"role": "user", "content": "What is the weather?"}])
    kwargs.setdefault("max_tokens", 120)
    return client.chat.completions.create(model="default", **kwargs)


def test_tool_choice_required_named_auto_and_streamed_on_the_tiny_model():
    with BackgroundServer([tiny_config(kv_cache_bytes=32 << 20)]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for seed in range(4):
            out = _chat(client, tools=TOOLS, tool_choice="required", seed=seed, temperature=1.0)
            choice = out.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            assert choice.message.content is None and choice.message.tool_calls
            for call in choice.message.tool_calls:
                _valid(call)
            one = _chat(
                client,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "add"}},
                seed=seed,
                temperature=1.0,
            )
            assert [c.function.name for c in one.choices[0].message.tool_calls] == ["add"]
            _valid(one.choices[0].message.tool_calls[0])
            single = _chat(
                client, tools=TOOLS, tool_choice="required", seed=seed, parallel_tool_calls=False
            )
            assert len(single.choices[0].message.tool_calls) == 1
        # Streamed: OpenAI's deltas (id, type and name first, then argument pieces) join to
        # the whole answer of the same seed.
        whole = _chat(client, tools=TOOLS, tool_choice="required", seed=3, temperature=1.0)
        chunks = list(
            _chat(client, tools=TOOLS, tool_choice="required", seed=3, temperature=1.0, stream=True)
        )
        calls: dict[int, dict] = {}
        for chunk in chunks:
            for d in chunk.choices[0].delta.tool_calls or []:
                if d.id is not None:
                    assert d.index not in calls and d.type == "function"
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls
        ]
        # auto: text, or calls that are valid; n choices each parsed.
        auto = _chat(client, tools=TOOLS, seed=2, temperature=1.0, n=3)
        for choice in auto.choices:
            for call in choice.message.tool_calls or []:
                _valid(call)
            assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
        # A tool-result turn is accepted and answered; "none" answers in text only.
        call = whole.choices[0].message.tool_calls[0]
        history = [
            {"role": "user", "content": "What is the weather?"},
            whole.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'},
        ]
        after = _chat(client, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8)
        assert after.choices[0].message.tool_calls is None
        assert after.choices[0].finish_reason in ("stop", "length")


def _tool(name: str, params: object = None) -> dict:
    fn = {"name": name} if params is None else {"name": name, "parameters": params}
    return {"type": "function", "function": fn}


BAD = [
    (
        {"tools": [_tool("f", {"properties": {"x": {"type": "nope"}}})]},
        r"tools\[0\]\.function\.parameters: json_schema",
    ),
    ({"tools": [_tool("f", {"type": "string"})]}, r"tools\[0\]\.function\.parameters: the type"),
    ({"tools": TOOLS + TOOLS[:1]}, r"tools\[2\]\.function\.name='get_weather': two tools"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name='nope': not among the tools",
    ),
    ({"tool_choice": "required"}, "tool_choice: needs tools"),
    (
        {"tools": TOOLS, "response_format": {"type": "json_object"}},
        "response_format='json_object': not with tools",
    ),
    ({"tools": [_tool("bad name")]}, r"tools\[0\]\.function\.name"),
]


def test_bad_tools_are_400s_naming_them_and_neighbours_are_served():
    with BackgroundServer([tiny_config(kv_cache_bytes=32 << 20)]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for change, match in BAD:
            with pytest.raises(openai.BadRequestError, match=match):
                _chat(client, **change)
        ok = _chat(client, tools=TOOLS, tool_choice="required", seed=1)
        _valid(ok.choices[0].message.tool_calls[0])


def test_a_tool_call_stream_dropped_mid_call_leaves_the_others_served_and_frees_its_kv():
    with BackgroundServer([tiny_config(kv_cache_bytes=32 << 20)]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        ask = {"tools": TOOLS, "tool_choice": "required", "seed": 5, "temperature": 1.0}
        expected = _chat(client, **ask).choices[0].message.tool_calls
        with _chat(client, stream=True, max_tokens=400, **ask) as dropped:
            for chunk in dropped:
                if chunk.choices and chunk.choices[0].delta.tool_calls:
                    break  # gone inside the call's arguments, its matcher mid-object
        again = _chat(client, **ask).choices[0].message.tool_calls
        assert [(c.function.name, c.function.arguments) for c in again] == [
            (c.function.name, c.function.arguments) for c in expected
        ]

        async def idle() -> bool:
            for _ in range(500):
                engine = server.runtime.engines[0]
                await engine.flush()
                if engine.stats().running == 0:
                    return True
                await asyncio.sleep(0.01)
            return False

        assert server.call(idle)
