"""Incremental detokenization (tokenizers' DecodeStream) gives exactly `tokenizer.decode`, and
stop strings are held back and cut as before."""

from __future__ import annotations

import random

import pytest

from parrot_actors.engines.detokenizer import Detokenizer
from parrot_actors.engines.model_loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


def run(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[str, str, bool]:
    det = Detokenizer(tokenizer, stop)
    streamed, hit = "", False
    for i in ids:
        delta, hit = det.add(i)
        streamed += delta
        if hit:
            break
    return streamed + det.flush(), det.final_text(), hit


def test_streamed_text_equals_decode_for_text_and_random_ids(tokenizer):
    rng = random.Random(0)
    texts = ["Hello, naïve café 😀 日本語 — 3.5 °C", "def f(x):\n    return x  # ok"]
    cases = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    cases += [[rng.randrange(tokenizer.vocab_size) for _ in range(120)] for _ in range(50)]
    for ids in cases:
        streamed, final, _ = run(tokenizer, ids)
        assert streamed == final == tokenizer.decode(ids, skip_special_tokens=True)
    assert Detokenizer(tokenizer)._stream is not None  # the library's incremental decoder


def test_a_stop_string_is_held_back_then_cut(tokenizer):
    ids = tokenizer.encode("The answer is 42. END of story", add_special_tokens=False)
    det = Detokenizer(tokenizer, ("END",))
    shown = ""
    for i in ids:
        delta, hit = det.add(i)
        shown += delta
        assert "E" not in shown  # never shown, then taken back
        if hit:
            break
    assert hit and det.final_text() == "The answer is 42. "
    assert shown + det.flush() == "The answer is 42. "
