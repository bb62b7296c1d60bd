"""The OpenAI-compatible endpoints with the real `openai` client, on a tiny random model:
texts equal generating by hand, usage counts are exact, streaming matches, bad requests are
4xx, and a client that disconnects mid-stream frees its context."""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlparse

import openai
import pytest

from parrot_actors.messages import SamplingParams
from parrot_actors.server import BackgroundServer
from tests.conftest import tiny_config

PROMPT = "The three primary colors are"
QUESTION = [{"role": "user", "content": "Name a large animal."}]


@pytest.fixture(scope="module")
def server():
    with BackgroundServer([tiny_config(kv_cache_bytes=32 << 20)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(server):
    return server.runtime.engines[0]


def by_hand(server, engine, prompt: str, **sampling):
    async def run():
        await engine.fill("by-hand", text=prompt)
        try:
            return await engine.generate("by-hand", SamplingParams(**sampling))
        finally:
            await engine.free_context("by-hand")

    return server.call(run)


def chat_prompt(engine, messages) -> str:
    return engine.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def generated(engine) -> int:
    return engine.stats().generated_tokens


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["random"]


def test_completion_matches_by_hand_with_exact_usage(server, client, engine):
    ref = by_hand(server, engine, PROMPT, max_tokens=10)
    before = generated(engine)
    got = client.completions.create(model="random", prompt=PROMPT, max_tokens=10, temperature=0)
    assert got.choices[0].text == ref.text
    assert got.choices[0].finish_reason == ref.finish_reason
    assert got.usage.prompt_tokens == len(engine.tokenize(PROMPT, first=True))
    assert got.usage.completion_tokens == generated(engine) - before == ref.completion_tokens
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_from_token_ids(client, engine):
    ids = engine.tokenize(PROMPT, first=True)
    by_ids = client.completions.create(model="random", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="random", prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_chat_completion_matches_by_hand(server, client, engine):
    prompt = chat_prompt(engine, QUESTION)
    ref = by_hand(server, engine, prompt, max_tokens=12)
    before = generated(engine)
    got = client.chat.completions.create(
        model="random", messages=QUESTION, max_tokens=12, temperature=0
    )
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == ref.text
    assert got.usage.prompt_tokens == len(engine.tokenize(prompt, first=True))
    assert got.usage.completion_tokens == generated(engine) - before == ref.completion_tokens


def test_streaming_chat_equals_the_whole_answer(client, engine):
    whole = client.chat.completions.create(
        model="random", messages=QUESTION, max_tokens=12, temperature=0
    )
    before = generated(engine)
    chunks = list(
        client.chat.completions.create(
            model="random",
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3
    assert "".join(texts) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == generated(engine) - before


def test_stop_and_seed(client):
    free = client.completions.create(model="random", prompt=PROMPT, max_tokens=16, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model="random", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    runs = [
        client.completions.create(
            model="random", prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.9, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and runs[0]


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"model": "gpt-5"}, openai.NotFoundError, "model 'gpt-5' is not served"),
        ({"n": 17}, openai.BadRequestError, "$.n"),
        ({"temperature": 3}, openai.BadRequestError, "$.temperature"),
        ({"extra_body": {"tools_x": 1}}, openai.BadRequestError, "`tools_x`"),
        ({"presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty"),
        ({"stop": [""]}, openai.BadRequestError, "stop strings must have 1 to 512 characters"),
        ({"stop": ["x"] * 17}, openai.BadRequestError, "$.stop"),
        ({"seed": -(1 << 63) - 1}, openai.BadRequestError, "$.seed"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(client, kwargs, error, words):
    args = {"model": "random", "messages": QUESTION, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        client.chat.completions.create(**args)
    assert words in info.value.body["message"]


def test_client_disconnect_mid_stream_frees_the_context(server, engine):
    base_blocks, base_generated = engine.stats().kv_blocks_used, generated(engine)
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = {
        "model": "random",
        "messages": QUESTION,
        "max_tokens": 400,
        "stream": True,
        "temperature": 0,
    }
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    while seen < 4:
        line = resp.fp.readline()
        seen += line.startswith(b"data: ")
    assert engine.stats().kv_blocks_used > base_blocks  # the generation holds its context
    conn.sock.close()  # the client goes away mid-generation
    conn.close()
    deadline = time.monotonic() + 10
    while engine.stats().kv_blocks_used != base_blocks:
        assert time.monotonic() < deadline, "context not freed after the disconnect"
        time.sleep(0.02)
    assert engine.stats().contexts == 0
    assert generated(engine) - base_generated < 400  # it stopped, it did not run to the end
