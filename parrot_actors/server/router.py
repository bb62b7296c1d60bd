"""Which engines serve a model, for the OpenAI-compatible API.

A request names a model: its name, an alias such as "default", or an engine's name. The
request itself runs as a call in the scheduler (placement, prefix sharing, retries); this module
only finds an engine of that model to tokenize and render its prompt with (engines of one model
share the tokenizer and the chat template) and the model name the call asks for.
"""

from __future__ import annotations

from parrot_actors.engines.api import EngineClient
from parrot_actors.runtime import Runtime
from parrot_actors.server.errors import BadRequestError, NotFoundError


class EngineRouter:
    """The runtime's engines, by model."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def engines(self) -> list[EngineClient]:
        """The runtime's engines."""
        return list(self.runtime.engines)

    def models(self) -> list[str]:
        """Names of the served models, sorted."""
        return sorted({e.model_name for e in self.engines})

    def pick(self, model: str) -> EngineClient:
        """An engine that serves `model` (a model name, an engine's alias or name), a healthy
        one when there is one. "default", unless an engine claims it as an alias, is the model
        of the first engine. Raises `NotFoundError` (404)."""
        engines = self.engines
        cands = [e for e in engines if model in (e.model_name, e.name, *e.aliases)]
        if not cands and model == "default" and engines:
            cands = [e for e in engines if e.model_name == engines[0].model_name]
        if not cands:
            raise NotFoundError(f"model {model!r} is not served; served models: {self.models()}")
        return next((e for e in cands if e.healthy), cands[0])


def completion_prompt(prompt: str | list[str | int]) -> str | list[int]:
    """The prompt of a completion request: text, one text in a list, or token ids. Raises
    `BadRequestError` for batches, empty lists and mixed lists."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    ids = [t for t in prompt if isinstance(t, int) and not isinstance(t, bool)]
    if prompt and len(ids) == len(prompt):
        return ids
    raise BadRequestError(
        "prompt: give one text, a list of one text, or a non-empty list of token ids "
        "(batched prompts are not supported; send one request each)"
    )
