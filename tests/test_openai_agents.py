"""Agents over the OpenAI API, with the real `openai` client on loopback: requests are calls in
the scheduler (app objectives apply, sessions are programs ordered by attained service), a
session's context is kept between turns and forked, `n` samples fork one prompt fill, logprobs
are the model's, hints are validated, and the details clients expect (tokenize, request ids,
models, error shape) hold."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from parrot_actors.engines import EngineConfig
from parrot_actors.engines.echo import EchoEngine
from parrot_actors.scheduler import SchedulerConfig
from parrot_actors.scheduler.policy import (
    CallInfo,
    EngineState,
    Placement,
    admission_key,
    schedule_app,
)
from parrot_actors.server import BackgroundServer, ServerConfig
from tests.conftest import TINY, tiny_config


class Answer:
    """An HTTP answer: status, headers, body text, and the body as JSON."""

    def __init__(self, status: int, headers, text: str) -> None:
        self.status_code, self.headers, self.text = status, headers, text

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Answer(resp.status, resp.headers, resp.read().decode())
    except urllib.error.HTTPError as err:
        return Answer(err.code, err.headers, err.read().decode())


# ---- the policy core: programs by attained service -------------------------------------------


def call(i: int, objective: str = "latency", **kw) -> CallInfo:
    return CallInfo(call_id=i, objective=objective, seq=i, **kw)


def test_admission_key_orders_objective_then_attained_then_arrival():
    assert admission_key("latency", 0.0, 7, 7, 5.0, attained=300) == (1, 300, 7, 7)
    assert admission_key("throughput", 0.0, 2, 9, 5.0, attained=0) == (2, 0, 2, 9)
    # Past the starvation bound only arrival counts, whatever the program was served.
    assert admission_key("throughput", 5.0, 2, 9, 5.0, attained=10**6) == (0, 0, 9, 9)


def test_a_fresh_program_is_placed_before_one_that_was_served_much():
    engines = [EngineState(name="a", model="m", free_blocks=1000)]
    heavy = [call(1, attained=5000), call(2, attained=5000)]
    fresh = call(3, attained=0)
    assert schedule_app([*heavy, fresh], engines, latency_cap=1) == [Placement(3, "a")]
    assert schedule_app([*heavy, fresh], engines, latency_cap=3) == [
        Placement(3, "a"),
        Placement(1, "a"),
        Placement(2, "a"),
    ]
    # Among equally served programs, arrival order.
    assert schedule_app([call(5, attained=40), call(4, attained=40)], engines) == [
        Placement(4, "a"),
        Placement(5, "a"),
    ]
    # The objective comes first: latency work of a heavy program before fresh throughput work.
    assert schedule_app([call(1, attained=5000), call(2, "throughput")], engines) == [
        Placement(1, "a"),
        Placement(2, "a"),
    ]


def test_the_starvation_bound_keeps_a_heavy_program_moving():
    engines = [EngineState(name="a", model="m", free_blocks=1000)]
    # Each round one slot frees and two fresh programs arrive; the heavy call waits 1 s a round.
    placed_at = None
    for rnd in range(10):
        ready = [
            call(1, attained=10**6, waited_s=float(rnd)),
            call(100 + 2 * rnd, attained=rnd),
            call(101 + 2 * rnd, attained=rnd),
        ]
        out = schedule_app(ready, engines, latency_cap=1, max_throughput_wait_s=5.0)
        assert len(out) == 1
        if out == [Placement(1, "a")]:
            placed_at = rnd
            break
        assert out == [Placement(100 + 2 * rnd, "a")]
    assert placed_at == 5


# ---- program scheduling end to end --------------------------------------------------------


def client_of(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def wait_until(server: BackgroundServer, predicate, timeout_s: float = 30.0) -> None:
    """Poll `predicate(runtime)` on the server's loop until it is true."""

    async def check():
        return predicate(server.runtime)

    deadline = time.monotonic() + timeout_s
    while not server.call(check):
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


def finish_order(server: BackgroundServer, hints: bool) -> list[str]:
    """A long session that was served many tokens and a fresh one each queue a request behind
    a running one (one call at a time): the order their requests finish."""
    client = client_of(server)

    def ask(name: str, text: str, session: str | None) -> str:
        body = {"parrot": {"session": session}} if hints and session else None
        client.completions.create(model="echo", prompt=text, max_tokens=4, extra_body=body)
        return name

    for i in range(3):  # the long session's history: 3 requests of 400 tokens each
        ask("history", f"{i} " + "x" * 400, "long")
    with ThreadPoolExecutor(3) as pool:
        order: list[str] = []
        blocker = pool.submit(ask, "blocker", "block", None)
        wait_until(server, lambda rt: len(rt.scheduler.running) == 1)
        long = pool.submit(ask, "long", "next turn of the long agent", "long")
        wait_until(server, lambda rt: len(rt.scheduler.ready) == 1)
        fresh = pool.submit(ask, "fresh", "first turn of a fresh agent", "fresh")
        wait_until(server, lambda rt: len(rt.scheduler.ready) == 2)
        for fut in (blocker, long, fresh):
            fut.add_done_callback(lambda f: order.append(f.result()))
    return order


def test_a_fresh_session_is_served_before_a_long_running_one():
    engine = EchoEngine(delay_s=0.3)
    with BackgroundServer([engine], scheduler=SchedulerConfig(latency_cap=1)) as server:
        assert finish_order(server, hints=True) == ["blocker", "fresh", "long"]
        stats = http("GET", server.url + "/v1/parrot/sessions/long").json()
        assert stats["calls"] == 4
        assert stats["attained_tokens"] == stats["prompt_tokens"] + stats["completion_tokens"]
        assert stats["prompt_tokens"] == 3 * 402 + len("next turn of the long agent")
    # Without hints the two are one-call apps: first come, first served.
    engine = EchoEngine(delay_s=0.3)
    with BackgroundServer([engine], scheduler=SchedulerConfig(latency_cap=1)) as server:
        assert finish_order(server, hints=False) == ["blocker", "long", "fresh"]


# ---- hints are validated ------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_server():
    with BackgroundServer([EchoEngine(model_name="echo")]) as srv:
        yield srv


@pytest.mark.parametrize(
    "hints,field",
    [
        ({"objective": "fast"}, "$.parrot.objective"),
        ({"retain_s": -1}, "$.parrot.retain_s"),
        ({"retain_s": 1e9}, "$.parrot.retain_s"),
        ({"session": ""}, "$.parrot.session"),
        ({"sesion": "a"}, "`sesion`"),
    ],
)
def test_bad_hints_are_400s_naming_the_field(echo_server, hints, field):
    client = client_of(echo_server)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model="echo", prompt="hi", max_tokens=2, extra_body={"parrot": hints}
        )
    assert field in info.value.body["message"]
    assert info.value.body["type"] == "invalid_request_error"
    ok = client.completions.create(
        model="echo", prompt="hi", max_tokens=2, extra_body={"parrot": {"session": "n"}}
    )
    assert ok.choices[0].text == "ec"


def test_session_header_and_its_bounds(echo_server):
    client = client_of(echo_server)
    before = http("GET", echo_server.url + "/v1/parrot/sessions/hdr").json()["calls"]
    client.completions.create(
        model="echo", prompt="hi", max_tokens=2, extra_headers={"X-Parrot-Session": "hdr"}
    )
    assert http("GET", echo_server.url + "/v1/parrot/sessions/hdr").json()["calls"] == before + 1
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model="echo", prompt="hi", max_tokens=2, extra_headers={"X-Parrot-Session": "s" * 300}
        )
    assert "X-Parrot-Session" in info.value.body["message"]


# ---- the details clients expect ---------------------------------------------------------------


def test_models_tokenize_detokenize_request_ids_and_error_shape(echo_server):
    url = echo_server.url
    models = http("GET", url + "/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [("echo", 4096)]
    assert abs(models[0]["created"] - time.time()) < 3600
    got = http("POST", url + "/tokenize", body={"model": "default", "prompt": "abc"}).json()
    assert got == {"tokens": [97, 98, 99], "count": 3, "max_model_len": 4096}
    back = http("POST", url + "/detokenize", body={"model": "echo", "tokens": [104, 105]})
    assert back.json() == {"prompt": "hi"}
    sent = http("GET", url + "/v1/models", headers={"X-Request-Id": "trace-42"})
    assert sent.headers["X-Request-Id"] == "trace-42"
    made = http("GET", url + "/v1/models").headers["X-Request-Id"]
    assert len(made) >= 16 and made != http("GET", url + "/v1/models").headers["X-Request-Id"]
    bad = http("POST", url + "/v1/completions", body={"model": "echo", "prompt": "x", "n": 99})
    assert bad.status_code == 400
    assert "X-Request-Id" in bad.headers
    error = bad.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "n"
    assert "$.n" in error["message"]
    missing = http("POST", url + "/v1/completions", body={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    best_of = http(
        "POST", url + "/v1/completions", body={"model": "echo", "prompt": "x", "best_of": 2}
    )
    assert best_of.status_code == 400 and "best_of" in best_of.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client_of(echo_server).completions.create(model="nope", prompt="x")


def gauge(server: BackgroundServer, name: str) -> float:
    for line in http("GET", server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on /metrics")


def test_metrics_show_retained_contexts(echo_server):
    client = client_of(echo_server)
    contexts = gauge(echo_server, "parrot_retained_contexts")
    tokens = gauge(echo_server, "parrot_retained_tokens")
    client.completions.create(
        model="echo",
        prompt="keep me",
        max_tokens=3,
        extra_body={"parrot": {"session": "kept", "retain_s": 60}},
    )
    assert gauge(echo_server, "parrot_retained_contexts") == contexts + 1
    assert gauge(echo_server, "parrot_retained_tokens") == tokens + len("keep me") + 3
    stats = http("GET", echo_server.url + "/v1/parrot/sessions/kept").json()
    assert stats["retained_tokens"] == len("keep me") + 3
    assert 50 < stats["retained_for_s"] <= 60


# ---- n > 1 by fork; logprobs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server():
    with BackgroundServer([tiny_config(kv_cache_bytes=32 << 20)]) as srv:
        yield srv


def stats_count(server: BackgroundServer) -> int:
    async def read():
        return len(server.runtime.scheduler.call_stats)

    return server.call(read)


def stats_after(server: BackgroundServer, count: int):
    """The stats of the call recorded after the first `count` ones: the answer may reach the
    client before the call's stats are recorded, so this waits for them (5 s at most)."""

    async def read():
        stats = server.runtime.scheduler.call_stats
        for _ in range(500):
            if len(stats) > count:
                return stats[count]
            await asyncio.sleep(0.01)
        raise AssertionError(f"no call stats after {count} within 5 s")

    return server.call(read)


def test_n_choices_fork_one_prompt_fill(tiny_server):
    client = client_of(tiny_server)
    prompt = "A unique prompt for the n test: the seven seas are"
    before = stats_count(tiny_server)
    many = client.completions.create(
        model="random", prompt=prompt, max_tokens=8, n=4, seed=1, temperature=1.0
    )
    stats = stats_after(tiny_server, before)
    p = many.usage.prompt_tokens
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert stats.computed_tokens == p and stats.reused_tokens == 3 * p
    assert many.usage.completion_tokens == stats.completion_tokens
    singles = [
        client.completions.create(
            model="random", prompt=prompt, max_tokens=8, seed=1 + i, temperature=1.0
        )
        for i in range(4)
    ]
    assert [c.text for c in many.choices] == [s.choices[0].text for s in singles]
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert len({c.text for c in many.choices}) > 1
    # Streamed, the same choices arrive interleaved, each closed by its own finish_reason.
    chunks = list(
        client.completions.create(
            model="random", prompt=prompt, max_tokens=8, n=4, seed=1, temperature=1.0, stream=True
        )
    )
    texts = ["", "", "", ""]
    finishes = [None] * 4
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] = finishes[choice.index] or choice.finish_reason
    assert texts == [c.text for c in many.choices]
    assert finishes == [c.finish_reason for c in many.choices]


def test_chat_logprobs_shape_streamed_and_whole(tiny_server):
    client = client_of(tiny_server)
    args = dict(
        model="random",
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    whole = client.chat.completions.create(**args)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the top one
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert [x.logprob for x in t.top_logprobs] == sorted(
            (x.logprob for x in t.top_logprobs), reverse=True
        )
    streamed = [
        t
        for chunk in client.chat.completions.create(**args, stream=True)
        for choice in chunk.choices
        if choice.logprobs is not None
        for t in choice.logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in content]
    # The second run reads the prompt's KV from the prefix cache: same values up to rounding.
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="random", prompt="x", logprobs=21)
    assert "$.logprobs" in info.value.body["message"]


# ---- retention: a multi-turn session under load that thrashes the prefix cache ----------------

WORDS = (
    "apple river stone cloud green quick music paper window garden bright silver ocean "
    "forest yellow candle mirror planet rabbit summer winter butter copper island"
).split()


def tool_result(rng: random.Random, n: int) -> str:
    return "Observation: " + " ".join(rng.choice(WORDS) for _ in range(n))


def agent_session(server: BackgroundServer, gap_s: float) -> tuple[list[str], list]:
    """A 6-turn chat session (turns `gap_s` apart, each appending a ~150-token tool result)
    while two clients keep sending fresh 500-token prompts: its answers and usages."""
    client = client_of(server)
    rng = random.Random(7)
    messages = [
        {"role": "system", "content": "You are a research agent. " + tool_result(rng, 60)},
        {"role": "user", "content": "Task: " + tool_result(rng, 150)},
    ]
    stop = threading.Event()

    def background(seed: int) -> None:
        noise = random.Random(seed)
        while not stop.is_set():
            ids = [noise.randrange(1000, 40000) for _ in range(500)]
            client.completions.create(model="random", prompt=ids, max_tokens=4, temperature=0)

    answers, usages = [], []
    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(background, s) for s in (1, 2)]
        try:
            for turn in range(6):
                if turn:
                    time.sleep(gap_s)  # the tool runs; the load goes on
                got = client.chat.completions.create(
                    model="random",
                    messages=messages,
                    max_tokens=12,
                    temperature=0,
                    extra_body={"parrot": {"session": "agent"}},
                )
                answers.append(got.choices[0].message.content)
                usages.append(got.usage)
                messages.append({"role": "assistant", "content": answers[-1]})
                messages.append({"role": "user", "content": tool_result(rng, 150)})
        finally:
            stop.set()
            for f in loads:
                f.result()
    return answers, usages


def session_stats(server: BackgroundServer, turns: int = 6) -> list:
    """The session's call stats, once all `turns` are recorded (5 s at most: an answer may
    reach the client before its call's stats are recorded)."""

    async def read():
        for _ in range(500):
            got = [s for s in server.runtime.scheduler.call_stats if s.program == "openai:agent"]
            if len(got) >= turns:
                break
            await asyncio.sleep(0.01)
        return got

    return server.call(read)


def long_tiny(**kw) -> EngineConfig:
    """The tiny model with room for a long session: 512 B of KV per token, so 1.5 MiB holds
    3072 tokens (a 1.3k-token session, the load's 1k running tokens, and little else)."""
    return EngineConfig(
        random_model={**TINY, "max_position_embeddings": 4096}, kv_cache_bytes=3 << 19, **kw
    )


def test_a_kept_session_computes_only_its_new_tokens_under_load():
    with BackgroundServer([long_tiny()]) as server:
        answers, usages = agent_session(server, gap_s=2.0)
        stats = session_stats(server)
    with BackgroundServer([long_tiny()], ServerConfig(port=0, default_retain_s=0)) as server:
        plain_answers, plain_usages = agent_session(server, gap_s=2.0)
        plain_stats = session_stats(server)
    assert answers == plain_answers  # token for token
    assert [u.prompt_tokens for u in usages] == [u.prompt_tokens for u in plain_usages]
    assert len(stats) == len(plain_stats) == 6
    for turn in range(1, 6):
        u, s = usages[turn], stats[turn]
        cached = u.prompt_tokens_details.cached_tokens
        # The previous turn's prompt and as much of its answer as re-tokenizes the same are
        # forked (the token where the answer meets "assistant\n" may merge differently);
        # only the rest is computed.
        assert cached >= usages[turn - 1].prompt_tokens - 1
        assert s.computed_tokens == u.prompt_tokens - cached
        assert s.reused_tokens == cached
        assert u.prompt_tokens - cached < 200
    # Without retention the load evicted the prefix cache between turns: all but the system
    # message (a shared prefix, kept by prefix sharing) is computed again each turn.
    system = {s.reused_tokens for s in plain_stats[1:]}
    assert len(system) == 1 and 0 < system.pop() < 100
    for turn in range(1, 6):
        u, s = plain_usages[turn], plain_stats[turn]
        assert u.prompt_tokens_details.cached_tokens == 0
        assert s.computed_tokens == u.prompt_tokens - s.reused_tokens
    computed = sum(s.computed_tokens for s in stats[1:])
    assert sum(s.computed_tokens for s in plain_stats[1:]) > 3 * computed


# ---- the real model: logprobs, and the app policy on OpenAI traffic ------------------------


@pytest.fixture(scope="module")
def real_server():
    with BackgroundServer([EngineConfig(name="real", max_running=8)]) as srv:
        yield srv


@pytest.mark.real_model
def test_greedy_logprobs_equal_transformers_log_softmax(real_server, hf_model):
    client = client_of(real_server)
    prompt = "The capital of France is"
    got = client.completions.create(
        model="default", prompt=prompt, max_tokens=8, temperature=0, logprobs=5
    )
    engine = real_server.runtime.engines[0]
    ids = engine.tokenize(prompt, first=True)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == got.usage.completion_tokens == 8
    with torch.no_grad():
        for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
            ref = torch.log_softmax(logits, dim=-1)
            best = int(ref.argmax())
            assert token == engine.detokenize([best])
            assert value == pytest.approx(float(ref[best]), abs=1e-4)
            values, indices = torch.topk(ref, 5)
            ref_top = [
                (engine.detokenize([t]), float(v))
                for t, v in zip(indices.tolist(), values.tolist(), strict=True)
            ]
            assert len(top) == len({text for text, _ in ref_top})
            for text, v in top.items():
                assert any(text == t and abs(v - r) < 1e-4 for t, r in ref_top)
            ids.append(best)


def race(server: BackgroundServer) -> tuple[float, float]:
    """16 throughput-objective completions running (8 at a time), then a latency-objective
    chat request: when the chat and the last completion finish (seconds, monotonic)."""
    client = client_of(server)
    engine = server.runtime.engines[0]

    def batch(i: int) -> float:
        client.completions.create(
            model="default",
            prompt=f"Count from {i}: {i}, {i + 1}, {i + 2},",
            max_tokens=24,
            temperature=0,
            extra_body={"parrot": {"objective": "throughput"}},
        )
        return time.monotonic()

    with ThreadPoolExecutor(16) as pool:
        start = engine.stats().generated_tokens
        batch_done = [pool.submit(batch, i) for i in range(16)]
        wait_until(server, lambda rt: len(rt.scheduler.running) == 16)
        wait_until(server, lambda rt: engine.stats().generated_tokens >= start + 8)
        client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Hi! How are you?"}],
            max_tokens=4,
            temperature=0,
            extra_body={"parrot": {"objective": "latency"}},
        )
        chat_done = time.monotonic()
        return chat_done, max(f.result() for f in batch_done)


@pytest.mark.real_model
def test_latency_chat_beats_a_running_throughput_batch(real_server):
    chat_done, batch_done = race(real_server)
    assert chat_done < batch_done
    # The request-level baseline serves it first come, first served: after the whole batch.
    fcfs = SchedulerConfig(policy="fcfs", prefix_sharing=False)
    with BackgroundServer([EngineConfig(name="real", max_running=8)], scheduler=fcfs) as server:
        chat_done, batch_done = race(server)
    assert chat_done > batch_done
