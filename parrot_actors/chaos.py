"""`parrot-actors chaos`: mixed traffic with random aborts, bad inputs and session deletions
against a running service, and a table of what happened.

Each worker loops until the deadline (or until `apps` apps ran), picking an app kind at random:

- `openai`: a greedy (or seeded) `/v1/completions`, streamed or not; its text must equal the
  reference computed at the start, when the service was idle;
- `parrot`: a two-call Parrot app (an answer, then a summary of it: the second call reads the
  first's output inside the service) in its own session; both values must equal the reference;
- `openai-abort` / `parrot-abort`: the same streamed, closed by the client at a random point
  (before the first token, i.e. during prefill, or after a few tokens); the Parrot ones leave
  their session to the server's reaper (a 2-second TTL);
- `delete`: a Parrot app whose session is deleted while its calls run;
- `bad`: a request no server should accept (bad sampling values, unknown model, malformed
  JSON, an over-long prompt, ...): it must be a 4xx.

Every operation has a timeout; one that runs out counts as lost. Before and after, the service's
/metrics give KV blocks in use, live sessions, engine restarts and the server's resident memory
(the "after" values are read once the service is idle again, waiting at most `settle_s`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea:",
    "A short poem about autumn:",
    "List three colors:",
    "Explain what a compiler does in one line:",
    "The best way to learn to cook is",
    "Q: What is 12 plus 30?\nA:",
    "Describe a cat in five words:",
    "One tip for writing clear code:",
    "The history of the bicycle began",
    "Translate 'good morning' to Spanish:",
    "Why is the sky blue? Because",
]
"""The prompt pool: every checked output is one of these, greedy or seeded."""

ANSWER = "Question: {{input:q}}\nAnswer: {{output:a}}"
SUMMARY = "Text: {{input:a}}\nThe same in five words: {{output:s}}"

BAD_REQUESTS: list[tuple[str, str, object]] = [
    ("POST", "/v1/completions", {"model": "default", "prompt": "x", "top_p": 0}),
    ("POST", "/v1/completions", {"model": "default", "prompt": "x", "temperature": -1}),
    ("POST", "/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 10**12}),
    ("POST", "/v1/completions", {"model": "default", "prompt": "x", "seed": 1 << 70}),
    ("POST", "/v1/completions", {"model": "no-such-model", "prompt": "x"}),
    ("POST", "/v1/completions", {"model": "default", "prompt": "word " * 20000}),
    ("POST", "/v1/completions", {"model": "default", "prompt": [10**9]}),
    ("POST", "/v1/completions", {"model": "default", "prompt": "x", "stop": [""]}),
    ("POST", "/v1/completions", b"{not json"),
    ("POST", "/v1/chat/completions", {"model": "default", "messages": "hi"}),
    ("POST", "/v1/chat/completions", {"model": "default", "messages": [], "n": 5}),
    ("GET", "/v1/variables/nope", None),
    ("POST", "/v1/calls", {"template": "no output here"}),
]
"""Requests that must be answered with a 4xx (the session routes answer 401 without one)."""

KINDS = {
    "openai": 4,
    "parrot": 3,
    "openai-abort": 3,
    "parrot-abort": 2,
    "delete": 1,
    "bad": 2,
}
"""App kinds and their relative weights."""


@dataclass
class ServiceState:
    """What /metrics says: KV blocks in use (all engines), live sessions, engine restarts (all
    engines), engines down, and the server's resident memory (bytes; 0 if not exported)."""

    kv_blocks_used: int = 0
    sessions: int = 0
    restarts: int = 0
    engines_down: int = 0
    rss_bytes: int = 0


@dataclass
class ChaosReport:
    """Counts per app kind and outcome ("ok", "aborted", "rejected" (a 4xx for a bad request),
    "wrong" (an output differing from its reference), "lost" (ran out of time), or an error
    type such as "http-503"), and the service's state before and after."""

    duration_s: float = 0.0
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, outcome) -> n
    examples: dict[str, str] = field(default_factory=dict)  # outcome -> one detail
    before: ServiceState = field(default_factory=ServiceState)
    after: ServiceState = field(default_factory=ServiceState)

    def count(self, outcome: str | None = None, kind: str | None = None) -> int:
        """Apps with this outcome and/or kind (None: any)."""
        return sum(
            n
            for (k, o), n in self.outcomes.items()
            if (outcome is None or o == outcome) and (kind is None or k == kind)
        )

    @property
    def errors(self) -> int:
        """Apps that ended in anything but ok, aborted or rejected."""
        return self.count() - self.count("ok") - self.count("aborted") - self.count("rejected")

    def table(self) -> str:
        """A markdown table of the run (one row per kind, then totals and the service)."""
        outcomes = sorted({o for _, o in self.outcomes})
        head = "| app kind | apps | " + " | ".join(outcomes) + " |"
        lines = [head, "|---|---:|" + "---:|" * len(outcomes)]
        for kind in [*KINDS, None]:
            name = kind or "**all**"
            cells = [str(self.count(o, kind)) for o in outcomes]
            lines.append(f"| {name} | {self.count(kind=kind)} | " + " | ".join(cells) + " |")
        b, a = self.before, self.after
        lines += [
            "",
            "| service | before | after |",
            "|---|---:|---:|",
            f"| KV blocks in use | {b.kv_blocks_used} | {a.kv_blocks_used} |",
            f"| live sessions | {b.sessions} | {a.sessions} |",
            f"| engine restarts | {b.restarts} | {a.restarts} |",
            f"| engines down | {b.engines_down} | {a.engines_down} |",
            f"| server RSS (MiB) | {b.rss_bytes / 2**20:.1f} | {a.rss_bytes / 2**20:.1f} |",
        ]
        lines.append(f"\nduration: {self.duration_s:.0f} s; errors: {self.errors}")
        for outcome, detail in sorted(self.examples.items()):
            lines.append(f"- {outcome}: {detail[:300]}")
        return "\n".join(lines)


class _Outcome(Exception):
    """Ends an app with a named outcome (and a detail for the report)."""

    def __init__(self, outcome: str, detail: str = "") -> None:
        super().__init__(detail)
        self.outcome = outcome


class Chaos:
    """One chaos run against `url` (see the module docstring).

    model: the model name to ask for. max_tokens: tokens per output. op_timeout_s: the longest
    any one app may take (seconds) before it counts as lost. api_key / metrics_key: the
    service's keys, if it has them. seed: the random choices (kinds, abort points).
    """

    def __init__(
        self,
        url: str,
        model: str = "default",
        max_tokens: int = 16,
        op_timeout_s: float = 120.0,
        api_key: str | None = None,
        metrics_key: str | None = None,
        seed: int = 0,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.max_tokens = max_tokens
        self.op_timeout_s = op_timeout_s
        self.key = {"X-Api-Key": api_key} if api_key else {}
        self.metrics_auth = {"Authorization": f"Bearer {metrics_key}"} if metrics_key else {}
        self.rng = random.Random(seed)
        self.ref_completion: dict[tuple[int, int | None], str] = {}
        self.ref_parrot: dict[int, tuple[str, str]] = {}
        self.http: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        """The HTTP session `run` opened. Raises `RuntimeError` outside a run."""
        if self.http is None:
            raise RuntimeError("Chaos: no HTTP session (requests are made inside `run`)")
        return self.http

    # ---- the service's state ----------------------------------------------------------------

    async def state(self) -> ServiceState:
        """The service's state from /metrics. Raises `aiohttp.ClientError` when unreachable."""
        from prometheus_client.parser import text_string_to_metric_families

        async with self._http().get(self.url + "/metrics", headers=self.metrics_auth) as r:
            r.raise_for_status()
            text = await r.text()
        st = ServiceState()
        for fam in text_string_to_metric_families(text):
            total = sum(s.value for s in fam.samples if not s.name.endswith("_created"))
            if fam.name == "parrot_engine_kv_blocks_used":
                st.kv_blocks_used = int(total)
            elif fam.name == "parrot_sessions":
                st.sessions = int(total)
            elif fam.name == "parrot_engine_restarts":
                st.restarts = int(total)
            elif fam.name == "parrot_engine_up":
                st.engines_down = sum(s.value == 0 for s in fam.samples)
            elif fam.name == "process_resident_memory_bytes":
                st.rss_bytes = int(total)
        return st

    async def settle(self, idle: ServiceState, timeout_s: float) -> ServiceState:
        """The state once KV and sessions are back to `idle`'s levels (or after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = await self.state()
            back = st.kv_blocks_used <= idle.kv_blocks_used and st.sessions <= idle.sessions
            if back or time.monotonic() > deadline:
                return st
            await asyncio.sleep(0.25)

    # ---- requests ---------------------------------------------------------------------------

    async def _json(
        self, method: str, path: str, body: object = None, token: str = ""
    ) -> dict[str, Any]:
        headers = dict(self.key)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = body if isinstance(body, bytes) else None
        payload = None if isinstance(body, bytes) or body is None else body
        async with self._http().request(
            method, self.url + path, json=payload, data=data, headers=headers
        ) as r:
            raw = await r.read()
            if r.status >= 400:
                raise _Outcome(f"http-{r.status}", raw.decode(errors="replace"))
            return json.loads(raw) if raw else {}

    def _completion_body(self, p: int, seed: int | None, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": PROMPTS[p],
            "max_tokens": self.max_tokens,
            "temperature": 0.0 if seed is None else 0.8,
            "stream": stream,
        }
        if seed is not None:
            body["seed"] = seed
        return body

    async def completion(self, p: int, seed: int | None, stream: bool) -> str:
        """The text of one completion (streamed pieces joined)."""
        body = self._completion_body(p, seed, stream)
        if not stream:
            out = await self._json("POST", "/v1/completions", body)
            completion: str = out["choices"][0]["text"]
            return completion
        text = []
        async with self._http().post(
            self.url + "/v1/completions", json=body, headers=self.key
        ) as r:
            if r.status >= 400:
                raise _Outcome(f"http-{r.status}", (await r.read()).decode(errors="replace"))
            async for line in r.content:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise _Outcome("stream-error", json.dumps(event["error"]))
                text += [c["text"] for c in event["choices"]]
        return "".join(text)

    async def parrot_app(self, p: int, wait: bool = True) -> tuple[str, str, str]:
        """A session with the two-call app submitted (and, with `wait`, both values); returns
        (token, answer, summary)."""
        s = await self._json("POST", "/v1/sessions", {"ttl_s": 2.0 if not wait else 60.0})
        token = s["token"]
        sampling = {"max_tokens": self.max_tokens, "temperature": 0.0}
        await self._json(
            "POST",
            "/v1/calls",
            {
                "template": ANSWER,
                "name": "answer",
                "args": {"q": {"value": PROMPTS[p]}, "a": {"var": "a", "sampling": sampling}},
            },
            token,
        )
        await self._json(
            "POST",
            "/v1/calls",
            {
                "template": SUMMARY,
                "name": "summary",
                "args": {"a": {"var": "a"}, "s": {"var": "s", "sampling": sampling}},
            },
            token,
        )
        if not wait:
            return token, "", ""
        try:
            got = await self._json("GET", "/v1/variables/s?timeout=600", token=token)
            if got["state"] != "done":
                raise _Outcome("parrot-failed", json.dumps(got.get("error")))
            return token, got["resolved"].get("a", ""), got["value"]
        finally:
            await self._json("DELETE", "/v1/session", token=token)

    # ---- app kinds --------------------------------------------------------------------------

    async def app_openai(self) -> None:
        p = self.rng.randrange(len(PROMPTS))
        seed = self.rng.choice([None, None, 7])
        text = await self.completion(p, seed, stream=self.rng.random() < 0.5)
        want = self.ref_completion[(p, seed)]
        if text != want:
            raise _Outcome("wrong", f"{PROMPTS[p]!r} (seed {seed}): {text!r} != {want!r}")

    async def app_parrot(self) -> None:
        p = self.rng.randrange(len(PROMPTS))
        _, a, s = await self.parrot_app(p)
        if (a, s) != self.ref_parrot[p]:
            raise _Outcome("wrong", f"parrot {PROMPTS[p]!r}: {(a, s)!r} != {self.ref_parrot[p]!r}")

    async def _read_then_close(self, resp: aiohttp.ClientResponse) -> None:
        # Close during prefill (before any token) or after a few streamed events.
        if self.rng.random() < 0.4:
            await asyncio.sleep(self.rng.uniform(0.0, 0.2))
        else:
            events = self.rng.randint(1, 6)
            async for line in resp.content:
                if line.startswith(b"data: ") or line.startswith(b"event: token"):
                    events -= 1
                    if events <= 0:
                        break
        resp.close()

    async def app_openai_abort(self) -> None:
        body = self._completion_body(self.rng.randrange(len(PROMPTS)), None, stream=True)
        body["max_tokens"] = self.max_tokens * 4
        resp = await self._http().post(self.url + "/v1/completions", json=body, headers=self.key)
        await self._read_then_close(resp)
        raise _Outcome("aborted")

    async def app_parrot_abort(self) -> None:
        token, _, _ = await self.parrot_app(self.rng.randrange(len(PROMPTS)), wait=False)
        headers = {**self.key, "Authorization": f"Bearer {token}"}
        var = self.rng.choice(["a", "s"])
        resp = await self._http().get(f"{self.url}/v1/variables/{var}/stream", headers=headers)
        await self._read_then_close(resp)
        raise _Outcome("aborted")  # the session is left to the server's reaper

    async def app_delete(self) -> None:
        token, _, _ = await self.parrot_app(self.rng.randrange(len(PROMPTS)), wait=False)
        await self._json("GET", "/v1/variables/s?timeout=0", token=token)  # want it: it runs
        await asyncio.sleep(self.rng.uniform(0.0, 0.5))
        await self._json("DELETE", "/v1/session", token=token)
        raise _Outcome("aborted")

    async def app_bad(self) -> None:
        method, path, body = self.rng.choice(BAD_REQUESTS)
        try:
            await self._json(method, path, body)
        except _Outcome as exc:
            status = int(exc.outcome.removeprefix("http-")) if "http-" in exc.outcome else 0
            if 400 <= status < 500:
                raise _Outcome("rejected") from None
            raise
        raise _Outcome("accepted-bad", f"{method} {path} was accepted")

    # ---- the run ----------------------------------------------------------------------------

    async def references(self) -> None:
        """Compute every reference output one at a time, on the idle service."""
        for p in range(len(PROMPTS)):
            for seed in (None, 7):
                self.ref_completion[(p, seed)] = await self.completion(p, seed, stream=False)
            _, a, s = await self.parrot_app(p)
            self.ref_parrot[p] = (a, s)

    async def run(
        self,
        duration_s: float | None = None,
        apps: int | None = None,
        concurrency: int = 16,
        settle_s: float = 60.0,
        progress: bool = True,
    ) -> ChaosReport:
        """Run until `duration_s` seconds passed or `apps` apps ran (whichever is given), with
        `concurrency` workers; returns the report."""
        from tqdm import tqdm

        report = ChaosReport()
        timeout = aiohttp.ClientTimeout(total=self.op_timeout_s)
        connector = aiohttp.TCPConnector(limit=concurrency * 2 + 8)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            self.http = http
            await self.references()
            report.before = await self.settle(ServiceState(), 30.0)
            idle = report.before
            kinds, weights = list(KINDS), list(KINDS.values())
            start = time.monotonic()
            deadline = start + duration_s if duration_s else None
            left = [apps if apps is not None else -1]
            bar = tqdm(total=apps or duration_s, disable=not progress, desc="chaos")

            async def worker() -> None:
                while True:
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    if left[0] == 0:
                        return
                    left[0] -= 1
                    kind = self.rng.choices(kinds, weights)[0]
                    outcome, detail = await self._one(kind)
                    report.outcomes[(kind, outcome)] += 1
                    if outcome not in ("ok", "aborted", "rejected"):
                        report.examples.setdefault(outcome, f"{kind}: {detail}")
                    if apps:
                        bar.update(1)
                    elif duration_s is not None:
                        bar.n = min(duration_s, round(time.monotonic() - start))
                        bar.refresh()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            bar.close()
            report.duration_s = time.monotonic() - start
            report.after = await self.settle(idle, settle_s)
        return report

    async def _one(self, kind: str) -> tuple[str, str]:
        fn = getattr(self, "app_" + kind.replace("-", "_"))
        try:
            await asyncio.wait_for(fn(), self.op_timeout_s)
        except _Outcome as exc:
            return exc.outcome, str(exc)
        except asyncio.TimeoutError:
            return "lost", f"no answer within {self.op_timeout_s:g} s"
        except aiohttp.ClientError as exc:
            return f"client-{type(exc).__name__}", str(exc)
        return "ok", ""


def build_parser() -> argparse.ArgumentParser:
    """The options of `parrot-actors chaos`."""
    p = argparse.ArgumentParser(
        prog="parrot-actors chaos",
        description="Mixed traffic with random aborts, bad inputs and session deletions "
        "against a running service; prints a table of outcomes and the service's state "
        "before and after.",
    )
    p.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:9000")
    p.add_argument("--minutes", type=float, help="run this long (default 1 unless --apps)")
    p.add_argument("--apps", type=int, help="run this many apps instead of a duration")
    p.add_argument("--concurrency", type=int, default=16, help="apps in flight (default 16)")
    p.add_argument("--model", default="default", help="model name to ask for")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per output (default 16)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before an app is lost")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choices")
    p.add_argument("--api-key", help="the service's API key (default: $PARROT_ACTORS_API_KEY)")
    p.add_argument("--metrics-key", help="the /metrics key (default: $PARROT_ACTORS_METRICS_KEY)")
    return p


def main(argv: list[str]) -> int:
    """Entry point of `parrot-actors chaos`; exit code 1 if any app was lost, wrong or failed
    with an unexpected error, or the service did not come back to its idle state."""
    import os

    args = build_parser().parse_args(argv)
    chaos = Chaos(
        args.url,
        model=args.model,
        max_tokens=args.max_tokens,
        op_timeout_s=args.timeout,
        api_key=args.api_key or os.environ.get("PARROT_ACTORS_API_KEY"),
        metrics_key=args.metrics_key or os.environ.get("PARROT_ACTORS_METRICS_KEY"),
        seed=args.seed,
    )
    minutes = args.minutes if args.minutes is not None else (None if args.apps else 1.0)
    report = asyncio.run(
        chaos.run(
            duration_s=minutes * 60 if minutes else None,
            apps=args.apps,
            concurrency=args.concurrency,
        )
    )
    print(report.table())
    clean = (
        report.after.kv_blocks_used <= report.before.kv_blocks_used
        and report.after.sessions <= report.before.sessions
    )
    return 0 if report.errors == 0 and clean else 1
