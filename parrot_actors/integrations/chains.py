"""Whole LCEL graphs as Semantic Variables: `compile_chain(runnable)` returns a Runnable whose
`ainvoke` / `abatch` submit the whole graph to Parrot at once instead of running it step by
step (Parrot §4: the service sees the app's dataflow, so dependent calls run without client
round trips, maps run as a task group, and shared prompt prefixes are filled once).

How each LCEL step compiles (values flow through the graph symbolically, as Semantic
Variables, until something needs their text):

- `PromptTemplate` / `ChatPromptTemplate`: formatted with a placeholder for each variable
  whose value is still being generated; the model's chat template renders the messages, and
  the placeholders become the call's input pieces.
- a `ChatParrot` step (or one with bound keywords): one Parrot call whose output is a Semantic
  Variable; `StrOutputParser` after it is the identity on that variable.
- `RunnableSequence` chains steps; `RunnableParallel` fans out (every branch is submitted
  before any answer exists: a map stage, which Parrot schedules as one task group);
  `RunnablePassthrough` and `RunnablePassthrough.assign` wire values through.
- a `RunnableLambda` that only routes values (`lambda d: d["summary"]`, dicts of them) runs on
  the symbolic values: nothing is awaited. One that reads generated text (`text.upper()`,
  `str(x)`, an f-string) cannot: reading a symbol raises, and the lambda becomes a boundary
  (so a lambda may run twice: it must have no side effects).
- anything else (a lambda that reads text, a retriever) is a boundary: the values it reads
  are awaited, it runs here on them, and compiling resumes on its output, so the pieces
  before and after it run as separate graphs. `strict=True` raises instead.

The compiled prompt text is exactly what `ChatParrot` would send step by step (the same chat
template over the same strings), so greedy outputs are token for token the same.

Over an embedded runtime (`ChatParrot(runtime=...)`) the engine renders the prompts and the
runtime takes the calls; over a service (`ChatParrot(url=...)`) a run opens one Parrot API
session (while its first stage renders), renders each stage's prompts in one request
(`POST /v1/parrot/render_chat`), posts its calls in one batch (`POST /v1/calls/batch`) with
the wait for the output sent beside it (`GET ...?created_within=`, so submitting and waiting
cost one round trip; plus one per boundary), and ends the session after returning.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from langchain_core.messages import AIMessage, convert_to_messages, convert_to_openai_messages
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.prompts import BasePromptTemplate, ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableLambda,
    RunnableParallel,
    RunnablePassthrough,
    RunnableSequence,
)
from langchain_core.runnables.config import RunnableConfig
from langchain_core.runnables.passthrough import RunnableAssign

from parrot_actors.errors import InvalidRequestError, TemplateError
from parrot_actors.integrations.langchain import ChatParrot, error_of_answer
from parrot_actors.runtime import Runtime
from parrot_actors.server.client import RemoteRuntime
from parrot_actors.server.config import ServerConfig
from parrot_actors.server.router import EngineRouter
from parrot_actors.variables.graph import Piece, SemanticCall
from parrot_actors.variables.perf import LATENCY
from parrot_actors.variables.variable import Variable

_MARK = re.compile("\ue000(\\d+)\ue001")
"""A placeholder for variable n inside rendered prompt text (private-use code points)."""


@dataclass
class ModelOut:
    """A chat model step's output: an `AIMessage` whose content is `var`."""

    var: Variable


@dataclass
class Prompt:
    """A formatted prompt whose text holds placeholders: `messages` (OpenAI dicts) for a chat
    prompt, else `text` (a string prompt, one user message to a chat model)."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    vars: dict[int, Variable] = field(default_factory=dict)


def compile_chain(runnable: Runnable[Any, Any], strict: bool = False) -> CompiledChain:
    """`runnable` (an LCEL graph over `ChatParrot` steps) as one Parrot submission per run.
    Raises `TemplateError` naming the step, when `strict` and a step cannot compile."""
    return CompiledChain(runnable, strict)


class CompiledChain(Runnable[Any, Any]):
    """A compiled LCEL graph: the same input and output as the chain it came from. `ainvoke`
    submits the whole graph before awaiting anything; `abatch` runs inputs concurrently (so
    their graphs share the engines' batches); `invoke` / `batch` run the async ones on the
    runtime's loop (from another thread) or, remote, on a private loop thread. Raises
    `TemplateError` (strict, a step that cannot compile)."""

    def __init__(self, chain: Runnable[Any, Any], strict: bool = False) -> None:
        self.chain = chain
        self.strict = strict
        self.llm = _first_model(chain)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Run the graph once (sync; see the class docstring)."""
        return self.llm._sync(self.ainvoke(input, config))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Run the graph once: submit every call it can, then await the output."""
        llm = self.llm
        if llm.runtime is not None:
            return await _Run(self.strict, _Embedded(llm.runtime)).output(self.chain, input)
        assert llm.url is not None, "ChatParrot validates url or runtime"
        backend = _Remote(llm.url, llm.api_key, RemoteRuntime(llm.url, api_key=llm.api_key))
        try:
            out = await _Run(self.strict, backend).output(self.chain, input)
        except BaseException:
            await backend.close()
            raise
        # The answer is here: the session ends off the caller's critical path (one round
        # trip less per run; a loop that stops first leaves it to the service's TTL).
        task = asyncio.get_running_loop().create_task(backend.close())
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)
        return out


_CLOSING: set[asyncio.Task[None]] = set()
"""Sessions of finished remote runs being ended (kept so their tasks are not collected)."""


async def sessions_ended() -> None:
    """Wait until the sessions of the remote runs that returned so far have ended (each run
    ends its session after returning its answer)."""
    while _CLOSING:
        await asyncio.gather(*list(_CLOSING), return_exceptions=True)


def _first_model(chain: Runnable[Any, Any]) -> ChatParrot:
    """The first ChatParrot in the graph (whose runtime and loop the chain runs on)."""
    todo: list[Any] = [chain]
    while todo:
        step = todo.pop(0)
        model = _model_of(step)
        if model is not None:
            return model[0]
        if isinstance(step, RunnableSequence):
            todo += step.steps
        elif isinstance(step, RunnableParallel):
            todo += list(step.steps__.values())
        elif isinstance(step, RunnableAssign):
            todo.append(step.mapper)
    raise InvalidRequestError("compile_chain: the chain has no ChatParrot step")


def _model_of(step: Any) -> tuple[ChatParrot, dict[str, Any]] | None:
    if isinstance(step, ChatParrot):
        return step, {}
    if isinstance(step, RunnableBinding) and isinstance(step.bound, ChatParrot):
        return step.bound, dict(step.kwargs)
    return None


class _Embedded:
    """Calls of a run on an embedded runtime: the engine renders, the runtime takes them."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.router = EngineRouter(runtime)

    async def render(self, model: str, chats: list[list[dict[str, Any]]]) -> tuple[str, list[str]]:
        """The served model's name and each conversation's prompt."""
        engine = self.router.pick(model)
        return engine.model_name, [engine.render_chat(c) for c in chats]

    async def ready(self) -> None:
        """Nothing to open: the runtime is running."""

    def submit(self, call: SemanticCall) -> None:
        self.runtime.submit(call)


class _Remote:
    """Calls of a run on a service: one request renders a stage's prompts, the Parrot API
    session of the run takes the calls. The session is created while the first stage
    renders (two requests in flight, one round trip) and ended by `close`."""

    def __init__(self, url: str, api_key: str | None, runtime: RemoteRuntime) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.runtime = runtime
        self._started: asyncio.Future[None] | None = None

    def _start(self) -> asyncio.Future[None]:
        if self._started is None:
            self._started = asyncio.ensure_future(self.runtime.start())
        return self._started

    async def ready(self) -> None:
        """The session exists. Raises what creating it raised (the service's typed error,
        `aiohttp.ClientError`)."""
        await self._start()

    async def close(self) -> None:
        """End the session (if it was opened); pending variables fail with `CallError`."""
        if self._started is None:
            return
        try:
            await self._started
        except Exception:  # the run already raised it; nothing was opened
            return
        await self.runtime.close()

    async def render(self, model: str, chats: list[list[dict[str, Any]]]) -> tuple[str, list[str]]:
        """The served model's name and each conversation's prompt."""
        self._start()  # the session is created while the prompts render
        body = {"model": model, "conversations": chats}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{self.url}/v1/parrot/render_chat", json=body, headers=self.headers
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise error_of_answer(resp.status, raw)
        answer = json.loads(raw)
        return str(answer["model"]), list(answer["prompts"])

    def submit(self, call: SemanticCall) -> None:
        self.runtime.submit(call)


Backend = _Embedded | _Remote


@dataclass
class _Pending:
    """A chat call built but not yet rendered and submitted."""

    llm: ChatParrot
    bound: dict[str, Any]
    prompt: Prompt
    out: Variable


class _Run:
    """One run of a compiled graph: calls are collected as the graph is walked and go to the
    backend in one batch (one render request remote) whenever a value must be awaited."""

    def __init__(self, strict: bool, backend: Backend) -> None:
        self.strict = strict
        self.backend = backend
        self.pending: list[_Pending] = []

    async def output(self, chain: Runnable[Any, Any], value: Any) -> Any:
        result = await self.step(chain, value)
        await self.flush()
        return await _concrete(result)

    async def step(self, step: Any, x: Any) -> Any:
        """`step` applied to the symbolic value `x` (calls collected, nothing awaited unless
        `step` is a boundary)."""
        if isinstance(step, RunnableSequence):
            for s in step.steps:
                x = await self.step(s, x)
            return x
        if isinstance(step, RunnableParallel):
            return {k: await self.step(s, x) for k, s in step.steps__.items()}
        if isinstance(step, RunnableAssign) and isinstance(x, dict):
            return {**x, **await self.step(step.mapper, x)}
        if type(step) is RunnablePassthrough and step.func is None and step.afunc is None:
            return x
        if isinstance(step, (ChatPromptTemplate, PromptTemplate)):
            return _format(step, x)
        if type(step) is StrOutputParser:
            return x.var if isinstance(x, ModelOut) else x
        if isinstance(step, RunnableLambda):
            routed = _route(step, x)
            if routed is not _NOT_ROUTED:
                return routed
        model = _model_of(step)
        if model is not None:
            out = Variable(name="chat")
            self.pending.append(_Pending(model[0], model[1], _as_prompt(x), out))
            return ModelOut(out)
        if self.strict:
            raise TemplateError(
                f"compile_chain(strict=True): cannot compile step {step.get_name()!r} "
                f"({type(step).__name__}); it would run client-side as a boundary"
            )
        await self.flush()
        return await step.ainvoke(await _concrete(x))

    async def flush(self) -> None:
        """Render and submit the collected calls, in the order they were built (producers
        before their consumers)."""
        batch, self.pending = self.pending, []
        by_model: dict[str, list[_Pending]] = {}
        for p in batch:
            by_model.setdefault(p.bound.get("model", p.llm.model), []).append(p)
        calls: dict[int, SemanticCall] = {}
        for model, group in by_model.items():
            chats = [p.prompt.messages or [_user(p.prompt.text)] for p in group]
            name, prompts = await self.backend.render(model, chats)
            for p, text in zip(group, prompts):
                pieces = _pieces(text, p.prompt.vars)
                sampling = tuple(sorted(_sampling(p.llm, p.bound).items()))
                pieces.append(Piece("output", var=p.out, sampling=sampling))
                calls[id(p)] = SemanticCall("chat", pieces, model=name)
        if batch:
            await self.backend.ready()
        for p in batch:
            self.backend.submit(calls[id(p)])


class _NeedsText(Exception):
    """A lambda read the text of a value still being generated."""


class _Sym:
    """A value still being generated, as a lambda sees it while routing: it can be passed
    along, put in a dict or list, and nothing else (reading it raises `_NeedsText`)."""

    __slots__ = ("value",)

    def __init__(self, value: Variable | ModelOut) -> None:
        self.value = value

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise _NeedsText

    __getattr__ = _refuse
    __str__ = __repr__ = __format__ = __bytes__ = _refuse
    __len__ = __iter__ = __contains__ = __getitem__ = __bool__ = _refuse
    __add__ = __radd__ = __mul__ = __rmul__ = __mod__ = __lt__ = __gt__ = _refuse
    __eq__ = __ne__ = __le__ = __ge__ = _refuse
    __hash__ = object.__hash__


_NOT_ROUTED = object()


def _route(step: RunnableLambda[Any, Any], x: Any) -> Any:
    """The output of a lambda that only routes values (picks keys, builds dicts), run on
    the symbolic input; `_NOT_ROUTED` when it reads a generated text, raises, or is async
    (then it is a boundary). The lambda may run twice, so it must have no side effects."""
    func = getattr(step, "func", None)
    if func is None or asyncio.iscoroutinefunction(func):
        return _NOT_ROUTED
    try:
        out = func(_wrap(x))
    except Exception:  # _NeedsText, or anything a lambda raises on a symbol
        return _NOT_ROUTED
    return _unwrap(out)


def _wrap(x: Any) -> Any:
    if isinstance(x, (Variable, ModelOut)):
        return _Sym(x)
    if isinstance(x, dict):
        return {k: _wrap(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _unwrap(x: Any) -> Any:
    if isinstance(x, _Sym):
        return x.value
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unwrap(v) for v in x]
    return x


def _user(text: str | None) -> dict[str, Any]:
    return {"role": "user", "content": text or ""}


def _sampling(llm: ChatParrot, bound: dict[str, Any]) -> dict[str, Any]:
    """The output's sampling, with the OpenAI path's defaults (temperature 1, top_p 1, the
    service's default max_tokens), so a compiled call samples as the step would."""

    def get(key: str) -> Any:
        return bound.get(key, getattr(llm, key))

    out: dict[str, Any] = {
        "temperature": 1.0 if get("temperature") is None else get("temperature"),
        "top_p": 1.0 if get("top_p") is None else get("top_p"),
        "max_tokens": get("max_tokens") or ServerConfig().default_max_tokens,
    }
    if get("seed") is not None:
        out["seed"] = get("seed")
    if get("stop"):
        out["stop"] = tuple(get("stop"))
    return out


def _pieces(text: str, vars: dict[int, Variable]) -> list[Piece]:
    """Rendered prompt text split at its placeholders into text and input pieces."""
    pieces: list[Piece] = []
    at = 0
    for m in _MARK.finditer(text):
        if m.start() > at:
            pieces.append(Piece("text", text=text[at : m.start()]))
        pieces.append(Piece("input", var=vars[int(m.group(1))]))
        at = m.end()
    if at < len(text):
        pieces.append(Piece("text", text=text[at:]))
    return pieces


def _format(template: BasePromptTemplate[Any], x: Any) -> Prompt:
    """The template formatted with placeholders for values still being generated."""
    if not isinstance(x, dict):
        names = template.input_variables
        if len(names) != 1:
            raise TemplateError(
                f"compile_chain: prompt with variables {names} got a {type(x).__name__}"
            )
        x = {names[0]: x}
    vars: dict[int, Variable] = {}
    args = {}
    for key, value in x.items():
        if isinstance(value, ModelOut):
            value = value.var
        if isinstance(value, Variable):
            vars[len(vars)] = value
            args[key] = f"\ue000{len(vars) - 1}\ue001"
        else:
            args[key] = value
    if isinstance(template, ChatPromptTemplate):
        messages = convert_to_openai_messages(template.format_messages(**args))
        return Prompt(messages=list(messages), vars=vars)
    return Prompt(text=template.format(**args), vars=vars)


def _as_prompt(x: Any) -> Prompt:
    """Whatever a chat model step receives, as a Prompt."""
    if isinstance(x, Prompt):
        return x
    if isinstance(x, ModelOut):
        x = x.var
    if isinstance(x, Variable):
        return Prompt(text="\ue0000\ue001", vars={0: x})
    if isinstance(x, str):
        return Prompt(text=x)
    return Prompt(messages=list(convert_to_openai_messages(x)))


async def _concrete(x: Any) -> Any:
    """`x` with every Semantic Variable awaited: a model output as an `AIMessage`, a
    variable as its text, a prompt as a prompt value."""
    if isinstance(x, ModelOut):
        return AIMessage(content=await x.var.get(perf=LATENCY))
    if isinstance(x, Variable):
        return await x.get(perf=LATENCY)
    if isinstance(x, dict):
        keys = list(x)
        values = await asyncio.gather(*(_concrete(x[k]) for k in keys))
        return dict(zip(keys, values))
    if isinstance(x, Prompt):
        texts = {n: await v.get(perf=LATENCY) for n, v in x.vars.items()}

        def fill(text: str) -> str:
            return _MARK.sub(lambda m: texts[int(m.group(1))], text)

        if x.messages is None:
            return StringPromptValue(text=fill(x.text or ""))
        messages = [{**m, "content": fill(str(m.get("content") or ""))} for m in x.messages]
        return ChatPromptValue(messages=convert_to_messages(messages))
    return x
