"""The per-mode context a scenario runs in: clock, records, progress, and the two clients.

Parrot mode uses `pa.Runtime.connect(url)` (semantic functions; the service runs dependent
calls itself). The baseline uses `openai.AsyncOpenAI` completions against the same service's
OpenAI-compatible endpoint, the way a LangChain-style app does: send a request, await its
answer, send the next, paying a simulated network round trip per request (Parrot §8: 250 ms).
`--rtt-dist paper` samples each round trip from the paper's network model instead (`paper_rtt`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from parrot_actors import clock
from scenarios.records import AppRecord, CallRecord

PAPER_RTT_S = (0.218, 0.345, 0.244)
"""The paper's network: round trips sampled from 100 measured gpt-35-turbo latencies, 218-345 ms,
mean 244 ms (../shared/paper_figures.md, common setup)."""


def paper_rtt(rng: random.Random) -> float:
    """One round trip of the paper's network model (seconds). The 100 measured latencies are
    not published, only their range and mean, so this draws Beta(1, b) scaled to 218-345 ms,
    b chosen for the 244 ms mean (b = (1 - m) / m, m = (244 - 218) / (345 - 218)): right-skewed
    like measured latencies, its 99th percentile (306 ms) nearest the maximum of 100 draws
    among Beta(a, b) with a >= 1 (a = 2 puts it at 288 ms)."""
    lo, hi, mean = PAPER_RTT_S
    m = (mean - lo) / (hi - lo)
    return lo + (hi - lo) * rng.betavariate(1.0, (1 - m) / m)


async def run_apps(
    count: int, app: Callable[[int], Awaitable[None]], sequential: bool = False
) -> None:
    """Run `app(0)` .. `app(count - 1)`: all at once, or one after another when
    `sequential` (the paper's Fig. 11 and 13 time one app at a time over its 10 articles)."""
    if sequential:
        for i in range(count):
            await app(i)
    else:
        await asyncio.gather(*(app(i) for i in range(count)))


@dataclass
class RunContext:
    """One mode's run. mode: "parrot" or "baseline". rtt_s: simulated network round trip
    (seconds) paid per request by the baseline and once per app by Parrot; rtt_dist "paper":
    each round trip drawn by `paper_rtt` instead (seeded by `seed`), half before the request
    and half after its answer (the paper's model; `complete`). model: the served
    model name (OpenAI `model`). tokenizer: the served model's, for token counts and
    truncation. variant: the client variant of a scenario with several (a `VARIANTS`
    label), else "". bar: a tqdm progress bar over apps (or None). extra: counters the
    scenario keeps (they land in `ModeResult.extra`)."""

    mode: str
    url: str
    rtt_s: float
    seed: int
    model: str
    tokenizer: object
    variant: str = ""
    bar: object | None = None
    openai: object | None = None
    apps: list[AppRecord] = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    round_trips: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=clock.now)
    rtt_dist: str = "fixed"

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def rtt(self) -> float:
        """The next round trip (seconds): `rtt_s`, or a draw of the paper's model."""
        return paper_rtt(self._rng) if self.rtt_dist == "paper" else self.rtt_s

    @property
    def parrot(self) -> bool:
        """True in Parrot mode."""
        return self.mode == "parrot"

    def now(self) -> float:
        """Seconds since the run started."""
        return clock.now() - self.t0

    def count(self, text: str) -> int:
        """Tokens of `text` (the served model's tokenizer, no special tokens)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def until(self, t: float) -> None:
        """Sleep until `t` seconds after the start (arrival times)."""
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    async def network(self) -> None:
        """One simulated network round trip (`rtt()` seconds)."""
        self.round_trips += 1
        rtt = self.rtt()
        if rtt > 0:
            await asyncio.sleep(rtt)

    def finish(
        self,
        app: int,
        kind: str,
        arrival: float,
        outputs: list[str],
        calls: int,
        progress: bool = True,
    ) -> None:
        """Record app `app` of class `kind` (due at `arrival` s) as done now, with its final
        outputs and number of LLM calls; `progress` advances the progress bar."""
        self.apps.append(
            AppRecord(
                app=app,
                kind=kind,
                arrival_s=arrival,
                e2e_s=self.now() - arrival,
                output_tokens=sum(self.count(o) for o in outputs),
                calls=calls,
            )
        )
        if progress and self.bar is not None:
            self.bar.update(1)

    def keep(self, key: str, text: str) -> None:
        """Remember call output `text` under `key` (the same key in both modes). Raises
        `KeyError` if the key is used twice (a scenario bug that would hide a comparison)."""
        if key in self.outputs:
            raise KeyError(f"output key {key!r} recorded twice")
        self.outputs[key] = text

    async def complete(self, prompt: str, max_tokens: int, name: str, app: int) -> str:
        """Baseline: one OpenAI completion of `prompt` (greedy, `max_tokens` tokens at most),
        streamed to time its first token, after one network round trip. Records a
        `CallRecord` (timed at the client, network excluded) and returns the text. With
        `rtt_dist` "paper" half the round trip is paid before the request and half after
        the answer. Raises the `openai` client's errors."""
        if self.rtt_dist == "paper":
            self.round_trips += 1
            half = self.rtt() / 2
            await asyncio.sleep(half)
        else:
            await self.network()
            half = 0.0
        start = self.now()
        stream = await self.openai.completions.create(
            model=self.model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        first = None
        parts: list[str] = []
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = self.now() if first is None else first
                parts.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage
        end = self.now()
        n_out = usage.completion_tokens if usage else 0
        ttft = (first if first is not None else end) - start
        self.calls.append(
            CallRecord(
                name=name,
                app=app,
                ttft_s=ttft,
                e2e_s=end - start,
                tpot_s=(end - start - ttft) / (n_out - 1) if n_out > 1 else 0.0,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=n_out,
            )
        )
        if half > 0:
            await asyncio.sleep(half)
        return "".join(parts)
