"""Grammar-constrained decoding (issue 14, first part): an engine request with a `Grammar`
always produces text of that grammar (JSON Schema, regex, choices), bad grammars are typed
errors naming the field, and OpenAI's `response_format` reaches it through the real `openai`
client. Outputs come from the tiny random-weight model, which never writes JSON on its own."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

import parrot_actors as pa
from parrot_actors.engines import Engine
from parrot_actors.engines.grammar import compile_grammar
from parrot_actors.errors import InvalidRequestError, TemplateError
from parrot_actors.messages import Grammar, SamplingParams
from parrot_actors.server import BackgroundServer
from tests.conftest import tiny_config

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}


async def test_every_constrained_output_is_of_its_grammar(tiny_engine: Engine):
    schema = Grammar(json_schema=json.dumps(SCHEMA))
    regex = Grammar(regex=r"[0-9]{3}-[a-z]{2}")
    choices = Grammar(choices=("yes", "no", "maybe so"))

    async def one(i: int, grammar: Grammar) -> str:
        await tiny_engine.fill(f"g{i}", token_ids=[100 + i, 200 + i, 300 + i])
        sp = SamplingParams(max_tokens=120, temperature=1.0, seed=i, grammar=grammar)
        result = await tiny_engine.generate(f"g{i}", sp)
        await tiny_engine.free_context(f"g{i}")
        assert result.finish_reason == "stop", result.text
        return result.text

    # One batch: constrained rows of three grammars beside an unconstrained request.
    await tiny_engine.fill("free", token_ids=[5, 6, 7])
    plain = asyncio.ensure_future(
        tiny_engine.generate("free", SamplingParams(max_tokens=8, ignore_eos=True))
    )
    outs = await asyncio.gather(*(one(i, (schema, regex, choices)[i % 3]) for i in range(12)))
    assert len((await plain).token_ids) == 8
    for i, text in enumerate(outs):
        if i % 3 == 0:
            jsonschema.validate(json.loads(text), SCHEMA)
        elif i % 3 == 1:
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text), text
        else:
            assert text in ("yes", "no", "maybe so")


async def test_unconstrained_greedy_output_is_unchanged_beside_constrained_requests(
    tiny_engine: Engine,
):
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    await tiny_engine.fill("alone", token_ids=[11, 12, 13, 14])
    alone = (await tiny_engine.generate("alone", greedy)).token_ids
    await tiny_engine.free_context("alone")
    await tiny_engine.fill("beside", token_ids=[11, 12, 13, 14])
    await tiny_engine.fill("json", token_ids=[11, 12, 13, 14])
    constrained = SamplingParams(max_tokens=60, grammar=Grammar(json_object=True))
    beside, _ = await asyncio.gather(
        tiny_engine.generate("beside", greedy), tiny_engine.generate("json", constrained)
    )
    for cid in ("beside", "json"):
        await tiny_engine.free_context(cid)
    assert beside.token_ids == alone


async def test_a_constrained_stream_dropped_mid_answer_leaves_the_others_served(
    tiny_engine: Engine,
):
    schema = Grammar(json_schema=json.dumps(SCHEMA))
    sp = SamplingParams(max_tokens=120, temperature=1.0, seed=7, grammar=schema)
    await tiny_engine.fill("ref", token_ids=[9, 8, 7])
    expected = (await tiny_engine.generate("ref", sp)).text
    await tiny_engine.free_context("ref")
    for cid in ("drop", "keep"):
        await tiny_engine.fill(cid, token_ids=[9, 8, 7])
    stream = tiny_engine.generate_stream("drop", sp)
    keep = asyncio.ensure_future(tiny_engine.generate("keep", sp))
    async for _ in stream:
        break  # the client goes away after one token, its matcher mid-object
    await stream.aclose()
    await tiny_engine.free_context("drop")
    assert (await keep).text == expected  # same seed, same grammar: the same valid answer
    jsonschema.validate(json.loads(expected), SCHEMA)
    await tiny_engine.free_context("keep")
    await tiny_engine.flush()
    assert (tiny_engine.stats().running, tiny_engine.stats().kv_blocks_used) == (0, 0)


@pytest.mark.parametrize(
    "grammar, match",
    [
        (Grammar(regex="a(b"), "regex does not compile: .*unclosed group"),
        (Grammar(json_schema='{"type": "objectx"}'), "json_schema does not compile: .*objectx"),
        (Grammar(json_schema="{x"), "json_schema is not JSON"),
        (Grammar(json_schema="[1, 2]"), "json_schema is a JSON list"),
        (Grammar(choices=()), r"choices=\[\]: must be 1 to 1024 non-empty strings"),
        (Grammar(choices=("a", "")), "non-empty strings"),
        (Grammar(), "set exactly one of"),
        (Grammar(regex="a", choices=("a",)), r"sets \['regex', 'choices'\]"),
    ],
)
async def test_bad_grammars_are_typed_errors_and_the_engine_serves_on(
    tiny_engine: Engine, grammar: Grammar, match: str
):
    with pytest.raises(InvalidRequestError, match=match):
        compile_grammar(grammar)
    await tiny_engine.fill("bad", token_ids=[1, 2, 3])
    with pytest.raises(InvalidRequestError, match=match):
        await tiny_engine.generate("bad", SamplingParams(max_tokens=4, grammar=grammar))
    ok = await tiny_engine.generate(
        "bad", SamplingParams(max_tokens=4, grammar=Grammar(choices=("fine",)))
    )
    await tiny_engine.free_context("bad")
    assert (ok.text, ok.finish_reason) == ("fine", "stop")


def test_openai_response_format_json_schema_and_json_object():
    with BackgroundServer([tiny_config(kv_cache_bytes=32 << 20)]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
        for seed in range(3):
            chat = client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": f"Describe person {seed} as JSON."}],
                response_format=fmt,
                max_tokens=120,
                temperature=1.0,
                seed=seed,
            )
            jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
        # Streamed: the deltas join to an answer of the schema.
        stream = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "A person, streamed."}],
            response_format=fmt,
            max_tokens=120,
            seed=5,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        jsonschema.validate(json.loads(text), SCHEMA)
        # Any JSON object: the random model mostly writes one endless key, so the seed is one
        # whose answer ends (chat samples at temperature 1 by default).
        obj = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Any JSON object."}],
            response_format={"type": "json_object"},
            max_tokens=200,
            seed=1,
        )
        assert obj.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
        done = client.completions.create(
            model="default", prompt="JSON:", max_tokens=120, extra_body={"response_format": fmt}
        )
        jsonschema.validate(json.loads(done.choices[0].text), SCHEMA)
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
        with pytest.raises(openai.BadRequestError, match="response_format: json_schema"):
            client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "x"}], response_format=bad
            )
        with pytest.raises(openai.BadRequestError, match="json_schema.schema: required"):
            client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": "x"}],
                response_format={"type": "json_schema", "json_schema": {"name": "x"}},
            )
        after = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "x"}], max_tokens=3
        )
        assert after.choices[0].finish_reason in ("stop", "length")


# ---- typed Semantic Variables ----------------------------------------------------------------


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    color: Literal["red", "green", "blue"]


@pa.semantic_function(max_tokens=80, temperature=1.0)
def describe(who: pa.Input, person: pa.Output(json_schema=Person, seed=3)):
    """Describe {{who}} as JSON: {{person}}"""


@pa.semantic_function(max_tokens=20, json_schema=SCHEMA["properties"]["address"])
def typed(
    topic: pa.Input,
    address: pa.Output,
    verdict: pa.Output(choices=["yes", "no"]),
    code: pa.Output(regex=r"[A-Z]{2}[0-9]{2}"),
):
    """About {{topic}}. Address: {{address}} Verdict: {{verdict}} Code: {{code}}"""


async def test_typed_semantic_variables_parse_and_consumers_read_the_text():
    async with pa.Runtime(engines=[tiny_config(kv_cache_bytes=32 << 20)]):
        await typed_app()


async def test_typed_semantic_variables_over_the_parrot_api():
    with BackgroundServer([tiny_config(kv_cache_bytes=32 << 20)]) as server:
        async with pa.Runtime.connect(server.url):
            await typed_app()


async def typed_app() -> None:
    """Typed outputs of three kinds, parsed, and one read by a consumer call as text."""
    people = [describe(f"person {i}") for i in range(3)]
    parsed = [await p.parsed() for p in people]
    assert all(isinstance(p, Person) for p in parsed)
    assert [p.model_dump_json() for p in parsed] == [
        Person.model_validate_json(await p).model_dump_json() for p in people
    ]
    address, verdict, code = typed("London")
    jsonschema.validate(await address.parsed(), SCHEMA["properties"]["address"])
    assert await verdict.parsed() in ("yes", "no")
    assert re.fullmatch(r"[A-Z]{2}[0-9]{2}", await code.parsed())
    # A consumer reads the JSON text as any other value.
    again = describe(address)
    assert isinstance(await again.parsed(), Person)
    assert again.producer.pieces[1].var is address


def test_bad_constraints_fail_at_decoration_naming_them():
    with pytest.raises(TemplateError, match="regex does not compile"):
        pa.Output(regex="a(b")
    with pytest.raises(TemplateError, match=r"\['json_schema', 'choices'\]: at most one"):
        pa.Output(json_schema={"type": "object"}, choices=["a"])
    with pytest.raises(TemplateError, match="choices='ab': a list of strings"):
        pa.Output(choices="ab")
    with pytest.raises(TemplateError, match="semantic_function f: json_schema does not compile"):

        @pa.semantic_function(json_schema={"type": "nope"})
        def f(out: pa.Output):
            """Answer: {{out}}"""
