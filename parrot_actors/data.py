"""Workload data: the shared real data when present, else smaller built-in real text.

The shared data lives in `../shared/data/workloads/` beside the project (override with
$PARROT_ACTORS_DATA). It is never copied into the project; without it, callers get a clear
message and text that ships with Python (the Python reference in `pydoc_data`).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parrot_actors.engines.api import Tokenizer

_warned: set[str] = set()


def data_dir() -> Path | None:
    """The `workloads` folder, or None when the shared data is absent."""
    env = os.environ.get("PARROT_ACTORS_DATA")
    candidates = [Path(env)] if env else []
    root = Path(__file__).resolve().parents[1]
    candidates += [
        root.parent / "shared" / "data" / "workloads",
        root / "shared" / "data" / "workloads",
    ]
    return next((c for c in candidates if c.is_dir()), None)


def _fallback(what: str) -> str:
    if what not in _warned:
        _warned.add(what)
        print(
            f"[parrot_actors] shared data for {what} not found (../shared/data/workloads); "
            "using built-in text from Python's own reference docs instead",
            file=sys.stderr,
        )
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in ("execmodel", "compound", "types", "specialnames"))


def read(relative: str, what: str) -> str:
    """Text of `workloads/<relative>`, or the built-in fallback text (with a message)."""
    d = data_dir()
    path = d / relative if d else None
    if path is None or not path.exists():
        return _fallback(what)
    return path.read_text(errors="replace")


def system_prompt() -> str:
    """The production system prompt of the shared-prompt experiment (Bing Chat preamble)."""
    return read("bingchat/sydney-prompt-preamble.txt", "the Bing Chat system prompt")


def article(i: int) -> str:
    """arXiv paper number `i` (0-9) of the chain/map-reduce summarization experiments."""
    return read(f"arxiv-march-2023/article_{i % 10}.txt", "the arXiv articles")


def truncate_tokens(tokenizer: Tokenizer, text: str, n: int) -> str:
    """The text of the first `n` tokens of `text`."""
    return tokenizer.decode(list(encoded(tokenizer, text)[:n]))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=64)
def encoded(tokenizer: Tokenizer, text: str) -> tuple[int, ...]:
    """`tokenizer.encode(text)` without special tokens, remembered for the last 64 (tokenizer,
    text) pairs: workloads cut the same few source texts (ten articles, one system prompt)
    thousands of times, and encoding an article takes ~20 ms. Tokenizers hash by identity."""
    return tuple(tokenizer.encode(text, add_special_tokens=False))
