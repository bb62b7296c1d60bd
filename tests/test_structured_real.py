"""Structured output and tool calls on the real 135M model (issue 14), which does not write
valid JSON or tool calls on its own: through the Parrot API (typed Semantic Variables), the
OpenAI API (real `openai` client) and langchain-openai's `ChatOpenAI`. One server for the
module."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pydantic
import pytest
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

import parrot_actors as pa
from parrot_actors.engines import EngineConfig
from parrot_actors.server import BackgroundServer

pytestmark = pytest.mark.real_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["mammal", "bird", "fish", "insect"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "habitat": {
            "type": "object",
            "properties": {
                "place": {"type": "string", "maxLength": 8},
                "wet": {"type": "boolean"},
            },
            "required": ["place", "wet"],
            "additionalProperties": False,
        },
        "foods": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 1},
    },
    "required": ["name", "kind", "legs", "habitat", "foods"],
    "additionalProperties": False,
}
ANIMALS = ["cat", "eagle", "salmon", "ant", "dog", "owl", "shark", "bee", "horse", "crow"]
PLACES = ["a forest", "the sea"]
PROMPTS = [f"Describe the {a} you saw in {p} as JSON." for a in ANIMALS for p in PLACES]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "add", "description": "Sum of two integers", "parameters": ADD},
    },
]


@pytest.fixture(scope="module")
def server():
    with BackgroundServer([EngineConfig(kv_cache_bytes=512 << 20)]) as server:
        yield server


@pa.semantic_function(max_tokens=100, temperature=0.0, json_schema=SCHEMA)
def animal(prompt: pa.Input, out: pa.Output):
    """{{prompt}}
    JSON: {{out}}"""


@pa.semantic_function(max_tokens=8, temperature=0.0)
def judge(
    prompt: pa.Input,
    kind: pa.Output(choices=["mammal", "bird", "fish", "insect"]),
    code: pa.Output(regex=r"[A-Z]{3}-[0-9]{2}"),
):
    """{{prompt}}
    Kind: {{kind}}
    Code: {{code}}"""


async def test_twenty_schema_outputs_validate_across_both_apis(server):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA}}
    async with pa.Runtime.connect(server.url):
        # Twenty different prompts: the first ten through the OpenAI API, the others through
        # the Parrot API (typed variables).
        outs = [animal(p) for p in PROMPTS[10:]]
        judged = [judge(p) for p in PROMPTS[:10]]
        # Everything awaited at once (remote calls run when awaited), so the engine serves
        # the 40 calls in the same batches.
        answers, parrot_texts, judged_texts = await asyncio.gather(
            asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="default",
                        messages=[{"role": "user", "content": p}],
                        response_format=fmt,
                        max_tokens=100,
                        temperature=0,
                    )
                    for p in PROMPTS[:10]
                )
            ),
            asyncio.gather(*(o.get() for o in outs)),
            asyncio.gather(*(v.get() for pair in judged for v in pair)),
        )
        texts = [a.choices[0].message.content for a in answers] + list(parrot_texts)
        parsed = [await o.parsed() for o in outs]
        kinds = [await k.parsed() for k, _ in judged]
        codes = list(judged_texts[1::2])
    assert len(texts) == 20 and len(set(texts)) > 10  # different prompts, different answers
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert parsed == [json.loads(t) for t in texts[10:]]
    assert all(k in ("mammal", "bird", "fish", "insect") for k in kinds)
    assert all(re.fullmatch(r"[A-Z]{3}-[0-9]{2}", c) for c in codes), codes


def _args(call) -> dict:
    schema = {"get_weather": WEATHER, "add": ADD}[call.function.name]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, {**schema, "additionalProperties": False})
    return args


def test_tool_choice_required_and_named_then_the_tool_result_turn(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    questions = ["What is the weather in Paris?", "What is 2 plus 3?"]
    for q in questions:
        messages = [{"role": "user", "content": q}]
        out = client.chat.completions.create(
            model="default", messages=messages, tools=TOOLS, tool_choice="required", temperature=0
        )
        assert out.choices[0].finish_reason == "tool_calls"
        calls = out.choices[0].message.tool_calls
        assert calls and {c.function.name for c in calls} <= {"get_weather", "add"}
        for call in calls:
            _args(call)
        named = client.chat.completions.create(
            model="default",
            messages=messages,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add"}},
            temperature=0,
        )
        assert [c.function.name for c in named.choices[0].message.tool_calls] == ["add"]
        _args(named.choices[0].message.tool_calls[0])
    # The tool's result goes back and the model answers (in text or with another call).
    call = named.choices[0].message.tool_calls[0]
    history = [
        *messages,
        named.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    after = client.chat.completions.create(
        model="default", messages=history, tools=TOOLS, temperature=0, max_tokens=40
    )
    choice = after.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    for c in choice.message.tool_calls or []:
        _args(c)


class Person(pydantic.BaseModel):
    """A person mentioned in the text."""

    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_langchain_openai_structured_output_and_bind_tools(server):
    llm = ChatOpenAI(
        base_url=server.url + "/v1",
        api_key="unused",
        model="default",
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke(
            "Alice is 31 years old. Who is mentioned?"
        )
        assert isinstance(person, Person)
    message = llm.bind_tools([multiply], tool_choice="multiply").invoke("What is 6 times 7?")
    assert isinstance(message, AIMessage)
    assert [c["name"] for c in message.tool_calls] == ["multiply"]
    assert set(message.tool_calls[0]["args"]) == {"a", "b"}
    streamed = None
    for chunk in llm.bind_tools([multiply], tool_choice="any").stream("What is 6 times 7?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.tool_calls
    assert all(c["name"] == "multiply" for c in streamed.tool_calls)
    assert streamed.response_metadata.get("finish_reason") == "tool_calls"
