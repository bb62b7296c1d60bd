"""The paper's example applications, written against the public API.

`make demo` runs them; tests and benchmarks reuse them. Sources: Parrot (OSDI 2024) Fig. 3
(WriteSnakeGame: code, then test code that reads the code) and §8.2 (map-reduce summary).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import parrot_actors as pa

# `pa.semantic_function` is annotated `-> Any` (variables/function.py), which mypy's strict
# mode reports at each decorator ([untyped-decorator]); the decorated names are
# `SemanticFunction`s.


@pa.semantic_function(max_tokens=96)
def write_code(task: pa.Input, code: pa.Output) -> None:
    """You are an expert software engineer.
    Write python code of {{input:task}}.
    Code: {{output:code}}"""


@pa.semantic_function()
def write_test(
    task: pa.Input,
    code: pa.Input,
    test: pa.Output(max_tokens=64),  # type: ignore[valid-type]  # the API's per-output form
) -> None:
    """You are an experienced QA engineer.
    You write test code for {{input:task}}.
    Code: {{input:code}}.
    Your test code: {{output:test}}"""


def snake_game(task: str = "a snake game") -> tuple[pa.Variable, pa.Variable]:
    """Submit WriteSnakeGame; returns (code, test) variables without waiting."""
    task_var = pa.Variable(task, name="task")
    code = write_code(task_var)
    test = write_test(task_var, code)
    return code, test


async def snake_game_request_level(task: str = "a snake game") -> tuple[str, str]:
    """WriteSnakeGame the request-level way (the baseline's client): send `write_code`, wait
    for its text, then send `write_test` with that text. Returns (code, test)."""
    code = str(await write_code(task).get(perf=pa.LATENCY))
    test = str(await write_test(task, code).get(perf=pa.LATENCY))
    return code, test


@pa.semantic_function(max_tokens=48)
def summarize_chunk(chunk: pa.Input, summary: pa.Output) -> None:
    """Summarize the following text in two sentences.
    Text: {{chunk}}
    Summary: {{summary}}"""


def make_reduce(n: int, max_tokens: int = 64) -> pa.variables.SemanticFunction:
    """A semantic function with `n` input summaries and one output `final`, built at run time
    (a reduce needs one parameter per map output)."""
    if n < 1:
        raise pa.TemplateError(f"make_reduce(n={n}): n must be >= 1")
    names = [f"summary{i}" for i in range(n)]

    def reduce_fn(*args: object, **kwargs: object) -> None:
        """Placeholder body; the docstring is set below."""

    params = [inspect.Parameter(x, inspect.Parameter.POSITIONAL_OR_KEYWORD) for x in names]
    params.append(inspect.Parameter("final", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    # inspect.signature reads `__signature__`, an attribute functions keep in their __dict__
    reduce_fn.__dict__["__signature__"] = inspect.Signature(params)
    reduce_fn.__annotations__ = {**{x: pa.Input for x in names}, "final": pa.Output}
    reduce_fn.__name__ = f"reduce{n}"
    bullets = "\n".join(f"- {{{{{x}}}}}" for x in names)
    reduce_fn.__doc__ = (
        f"Combine these partial summaries into one summary.\n{bullets}\nSummary: {{{{final}}}}"
    )
    fn: pa.variables.SemanticFunction = pa.semantic_function(max_tokens=max_tokens)(reduce_fn)
    return fn


def chunk_words(text: str, num_chunks: int, words_per_chunk: int) -> list[str]:
    """The first `num_chunks` pieces of `words_per_chunk` words each (fewer if text is short)."""
    words = text.split()
    chunks = [
        " ".join(words[i : i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)
    ]
    return [c for c in chunks[:num_chunks] if c]


def map_reduce_summary(chunks: list[str]) -> tuple[list[pa.Variable], pa.Variable]:
    """Submit one summary per chunk and a reduce over all of them; returns (maps, final)."""
    maps = [summarize_chunk(pa.Variable(c, name=f"chunk{i}")) for i, c in enumerate(chunks)]
    final = make_reduce(len(maps))(*maps)
    assert isinstance(final, pa.Variable)  # one output: one Variable (several give a tuple)
    return maps, final


async def map_reduce_request_level(chunks: list[str]) -> tuple[list[str], str]:
    """The map-reduce summary the request-level way (the baseline's client, as in
    docs/design.md): send one map, wait for its text, send the next, then the reduce over the
    texts. Returns (summaries, final)."""
    summaries = [str(await summarize_chunk(c).get(perf=pa.LATENCY)) for c in chunks]
    final = make_reduce(len(summaries))(*summaries)
    assert isinstance(final, pa.Variable)
    return summaries, str(await final.get(perf=pa.LATENCY))


def demo_document(path: str | None = None) -> tuple[str, str]:
    """(title, text) of a real document: the file at `path`, else the "Execution model"
    chapter of the Python reference that ships with Python (pydoc_data)."""
    if path:
        return Path(path).name, Path(path).read_text(errors="replace")
    from pydoc_data.topics import topics

    return "Python reference: Execution model", topics["execmodel"]
