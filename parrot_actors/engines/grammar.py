"""Grammar-constrained decoding: a `Grammar` becomes an llguidance matcher per request, and
each step masks the logits of constrained requests to the tokens that keep the output valid.

Library: llguidance (github.com/guidance-ai/llguidance: `LLMatcher`, `llguidance.hf`,
`llguidance.torch`). Chosen over xgrammar on this project's CPU by
`benchmarks/grammar_mask.py`: at batch 32 a step costs ~0.8 ms of mask filling and ~0.24 ms
of applying (xgrammar: ~0.2 ms and 6.4 ms), about 0.3% of a batch-32 decode step, with no
dependencies of its own. Bitmasks are `[rows, ceil(vocab / 32)]` int32, one bit per token.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from parrot_actors.errors import InvalidRequestError
from parrot_actors.messages import Grammar

MAX_GRAMMAR_CHARS = 200_000
"""Longest schema or regex accepted (characters)."""


def _compact(schema: dict[str, Any] | bool) -> dict[str, Any] | bool:
    """`schema` with llguidance's fixed JSON separators unless it sets its own `x-guidance`
    options: with flexible whitespace a model can pad an object with blanks until it runs
    out of tokens (small models do)."""
    if isinstance(schema, dict) and "x-guidance" not in schema:
        return {**schema, "x-guidance": {"whitespace_flexible": False}}
    return schema


@functools.lru_cache(maxsize=256)
def compile_grammar(grammar: Grammar) -> str:
    """llguidance's grammar text for `grammar`, checked (cached per grammar: a schema used by
    many requests is compiled once). Raises `InvalidRequestError` naming the field and the
    library's message for a schema that is not JSON or not JSON Schema, a regex or Lark
    grammar that does not compile, or empty choices."""
    grammar.validate()
    text = next(
        (t for t in (grammar.json_schema, grammar.regex, grammar.lark) if t is not None), None
    )
    if text is not None and len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(f"grammar of {len(text)} characters: at most {MAX_GRAMMAR_CHARS}")
    field = "json_schema"
    if grammar.json_schema is not None:
        try:
            schema = json.loads(grammar.json_schema)
        except ValueError as exc:
            raise InvalidRequestError(f"json_schema is not JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(
                f"json_schema is a JSON {type(schema).__name__}: a JSON Schema is an object"
            )
        compiled = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(_compact(schema)))
    elif grammar.json_object:
        compiled = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(_compact({"type": "object"}))
        )
    elif grammar.regex is not None:
        field = "regex"
        compiled = llguidance.LLMatcher.grammar_from_regex(grammar.regex)
    elif grammar.lark is not None:
        field = "lark"
        compiled = llguidance.LLMatcher.grammar_from_lark(grammar.lark)
    else:
        field = "choices"
        assert grammar.choices is not None, "validate() leaves exactly one field set"
        # Lark string literals take JSON's escapes, so any choice text is one literal.
        lark = "start: " + " | ".join(json.dumps(c) for c in grammar.choices)
        compiled = llguidance.LLMatcher.grammar_from_lark(lark)
    error = llguidance.LLMatcher.validate_grammar(compiled)
    if error:
        # The library's message spans lines (a caret under the fault): one line for HTTP.
        raise InvalidRequestError(f"{field} does not compile: {' '.join(error.split())}")
    return compiled


class Grammars:
    """The constrained-decoding side of one engine: the model's vocabulary as llguidance sees
    it (built on first use, ~0.4 s for a 49k-token vocabulary), matchers for requests, and
    batched masking of logits rows."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        """hf_tokenizer: the model's transformers tokenizer. vocab_size: the width of the
        model's logits (tokens); ids the tokenizer lacks are never allowed."""
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def prepare(self, grammar: Grammar) -> None:
        """Do the slow parts of a first use ahead, off the engine loop (the engine calls this
        in a worker thread before adding a constrained generate): build the vocabulary's
        llguidance view and compile `grammar`. Raises `InvalidRequestError` (see
        `compile_grammar`)."""
        self._vocabulary()
        compile_grammar(grammar)

    def _vocabulary(self) -> llguidance.LLTokenizer:
        with self._lock:  # `prepare` threads and the loop may race to build it once
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            return self._tokenizer

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A fresh matcher at the start of `grammar`. Raises `InvalidRequestError` (see
        `compile_grammar`)."""
        compiled = compile_grammar(grammar)
        matcher = llguidance.LLMatcher(self._vocabulary(), compiled)
        if matcher.is_error():
            raise InvalidRequestError(f"grammar rejected: {matcher.get_error()}")
        return matcher

    def masked(self, logits: torch.Tensor, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """A float32 copy of `logits` `[rows, vocab_size]` (row i for `matchers[i]`) with every
        token that its matcher forbids at -inf: one bitmask fill per row, one batched apply."""
        rows = logits.shape[0]
        mask = llguidance.torch.allocate_token_bitmask(rows, self.vocab_size)
        for i, m in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(m, mask, i)
        out = logits.float().clone()
        llguidance.torch.apply_token_bitmask_inplace(out, mask.to(out.device, non_blocking=True))
        return out
