"""OpenAI-compatible endpoints, so agent frameworks and the request-level baseline use the
service unchanged: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream or
not, `n`, `logprobs`, usage counts, stop, temperature, top_p, max_tokens, seed), and POST
/tokenize and /detokenize.

Every request is a call in the scheduler, like a Parrot API call: the same placement policy,
prefix sharing at the token level (so outputs never change), the engines' prefix caching,
per-call stats, and a re-run when its engine dies before anything was sent. App hints
(`ParrotHints`, in the body as `"parrot": {...}` or as the header `X-Parrot-Session`) give the
request an objective and a session: the session's requests are one program, scheduled by its
attained service, and each turn's context is kept for `retain_s` seconds so the next turn
forks it and computes only its new tokens. Without hints a request is a one-call latency app.

Tools (`tools`, `tool_choice`, `parallel_tool_calls`; "tool" messages and assistants'
`tool_calls` in the history) are written into the prompt in the Hermes format, by the chat
template when it does that itself (`engines.tool_format`); "required" and a named tool
constrain the whole output to valid calls, "auto" constrains each call from its opening
`<tool_call>` on. Answers carry `tool_calls` (ids `call_...`, arguments as JSON text) and
finish reason "tool_calls", whole and streamed in OpenAI's delta shapes. Under
`tool_choice: "none"` the tools stay in the prompt (an agent's turns keep one prefix) and the
output is plain text.

`n` samples the choices from one fill of the prompt (seeds `seed + i`). `logprobs` are the
log-softmax of the model's logits divided by the temperature (of the raw logits when greedy),
before top-k and top-p. Usage counts are exact: prompt tokens are the tokenizer's length of the
prompt as the engine holds it, completion tokens those of every choice, and
`prompt_tokens_details.cached_tokens` the prompt tokens taken from the session's previous turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from parrot_actors import clock
from parrot_actors.engines.api import EngineClient
from parrot_actors.engines.grammar import compile_grammar
from parrot_actors.engines.tool_format import Named, ToolChoice, tool_grammar
from parrot_actors.errors import CallError, InvalidRequestError, ParrotError
from parrot_actors.messages import Grammar, SamplingParams, TokenDelta
from parrot_actors.runtime import Runtime
from parrot_actors.server.calls import check_sampling
from parrot_actors.server.config import ServerConfig
from parrot_actors.server.errors import BadRequestError, openai_error
from parrot_actors.server.http import SSE_HEADERS, json_response, read_body, sse_event
from parrot_actors.server.metrics import Metrics
from parrot_actors.server.openai_format import ChatFormat, TextFormat, chat_messages
from parrot_actors.server.protocol import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    HintSessionStats,
    ModelCard,
    ModelList,
    NamedToolChoice,
    ParrotHints,
    PromptTokensDetails,
    RenderChatRequest,
    RenderChatResponse,
    ResponseFormat,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from parrot_actors.server.router import EngineRouter, completion_prompt
from parrot_actors.variables.graph import Piece, SemanticCall
from parrot_actors.variables.perf import LATENCY
from parrot_actors.variables.variable import Variable

DEFAULT_COMPLETION_TOKENS = 16
"""`max_tokens` of a completion that sets none (OpenAI's default)."""
SESSION_HEADER = "X-Parrot-Session"
"""The header naming a request's session, for clients that cannot add body fields."""

Format = TextFormat | ChatFormat


class OpenAIAPI:
    """Handlers of the OpenAI-compatible API over the shared runtime."""

    def __init__(
        self, runtime: Runtime, router: EngineRouter, config: ServerConfig, metrics: Metrics
    ) -> None:
        self.runtime = runtime
        self.router = router
        self.config = config
        self.metrics = metrics
        self.started = int(time.time())

    def routes(self) -> list[web.RouteDef]:
        """The API's routes."""
        return [
            web.get("/v1/models", self.models),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/tokenize", self.tokenize),
            web.post("/detokenize", self.detokenize),
            web.get("/v1/parrot/sessions/{session}", self.session_stats),
            web.post("/v1/parrot/render_chat", self.render_chat),
        ]

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: each served model, with its longest context."""
        cards = []
        for model in self.router.models():
            engines = [e for e in self.router.engines if e.model_name == model]
            lengths = [e.stats().max_model_len for e in engines]
            cards.append(ModelCard(id=model, created=self.started, max_model_len=max(lengths)))
        return json_response(ModelList(data=cards))

    async def tokenize(self, request: web.Request) -> web.Response:
        """POST /tokenize."""
        req = await read_body(request, TokenizeRequest, self.config.max_body_bytes)
        engine = self.router.pick(req.model)
        ids = engine.tokenize(req.prompt, first=req.add_special_tokens)
        limit = engine.stats().max_model_len
        return json_response(TokenizeResponse(tokens=ids, count=len(ids), max_model_len=limit))

    async def detokenize(self, request: web.Request) -> web.Response:
        """POST /detokenize."""
        req = await read_body(request, DetokenizeRequest, self.config.max_body_bytes)
        engine = self.router.pick(req.model)
        try:
            text = engine.detokenize(req.tokens)
        except (ValueError, OverflowError, TypeError) as exc:  # ids outside the vocabulary
            raise BadRequestError(f"tokens: cannot be decoded: {exc}") from None
        return json_response(DetokenizeResponse(prompt=text))

    async def render_chat(self, request: web.Request) -> web.Response:
        """POST /v1/parrot/render_chat: prompts of conversations in the model's chat template
        (for clients that build calls over it, e.g. `integrations.chains.compile_chain`)."""
        req = await read_body(request, RenderChatRequest, self.config.max_body_bytes)
        engine = self.router.pick(req.model)
        prompts = [engine.render_chat(chat_messages(c)) for c in req.conversations]
        return json_response(RenderChatResponse(model=engine.model_name, prompts=prompts))

    async def session_stats(self, request: web.Request) -> web.Response:
        """GET /v1/parrot/sessions/{session}: what a hint session has been served and the
        context kept for it (see `HintSessionStats`); zeros for a session never seen (or
        forgotten among more than `SchedulerConfig.max_programs`)."""
        session = request.match_info["session"]
        scheduler = self.runtime.scheduler
        out = HintSessionStats(session=session)
        if scheduler is None:
            return json_response(out)
        program = program_of(session)
        served = scheduler.program_stats(program)
        if served is not None:
            out = HintSessionStats(
                session=session,
                calls=served.calls,
                prompt_tokens=served.prompt_tokens,
                completion_tokens=served.completion_tokens,
                computed_tokens=served.computed_tokens,
                reused_tokens=served.reused_tokens,
                cached_tokens=served.cached_tokens,
                attained_tokens=served.attained_tokens,
                attained_s=round(served.service_s, 6),
            )
        kept = scheduler.retention.of(program)
        if kept is not None:
            out.retained_tokens = len(kept.tokens)
            out.retained_for_s = round(max(0.0, kept.expires_at - clock.now()), 3)
        return json_response(out)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        req = await read_body(request, CompletionRequest, self.config.max_body_bytes)
        _check_neutral(req)
        _check_unsupported(req, echo=False, best_of=1, suffix=None)
        engine = self.router.pick(req.model)
        prompt = completion_prompt(req.prompt)
        sampling = _sampling(req, req.max_tokens or DEFAULT_COMPLETION_TOKENS, req.logprobs)
        fmt = TextFormat(req.model, req.logprobs, _token_text(engine))
        hints = self._hints(request.headers.get(SESSION_HEADER), req.parrot)
        if isinstance(prompt, str):
            call, var = self._call(engine, ("", prompt), None, sampling, hints, req)
        else:
            call, var = self._call(engine, ("", ""), tuple(prompt), sampling, hints, req)
        return await self._respond(request, Prepared(req, call, var, fmt))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        req = await read_body(request, ChatRequest, self.config.max_body_bytes)
        prepared = self.prepare_chat(req, request.headers.get(SESSION_HEADER))
        return await self._respond(request, prepared)

    def prepare_chat(self, req: ChatRequest, session_header: str | None = None) -> Prepared:
        """A chat completion request as a call, not yet submitted: what the HTTP handler and
        in-process clients (`integrations.langchain.ChatParrot` over an embedded runtime)
        share. session_header: the `X-Parrot-Session` header, if any. Raises
        `BadRequestError` / `InvalidRequestError` (400) for values the service refuses and
        `NotFoundError` (404) for a model it does not serve."""
        _check_neutral(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequestError("top_logprobs: needs logprobs: true")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens or self.config.default_max_tokens
        tools, choice = _tools(req)
        sampling = _sampling(req, max_tokens, logprobs)
        if choice != "none":
            sampling = msgspec.structs.replace(
                sampling, grammar=_tool_grammar(tools, choice, req.parallel_tool_calls)
            )
        engine = self.router.pick(req.model)
        messages = chat_messages(req.messages)
        # Tools stay in the prompt under "none" too: an agent's turns keep one prefix, so
        # each turn forks the previous one's context.
        offered = tools or None
        prompt = engine.render_chat(messages, offered)
        head = _system_head(engine, messages, prompt, offered)
        fmt = ChatFormat(req.model, logprobs, _token_text(engine), tools=choice != "none")
        hints = self._hints(session_header, req.parrot)
        call, var = self._call(engine, (head, prompt[len(head) :]), None, sampling, hints, req)
        return Prepared(req, call, var, fmt)

    def _call(
        self,
        engine: EngineClient,
        text: tuple[str, str],
        prompt_ids: tuple[int, ...] | None,
        sampling: SamplingParams,
        hints: ParrotHints,
        req: CompletionRequest | ChatRequest,
    ) -> tuple[SemanticCall, Variable]:
        """The request as a call with one output: its prompt is `text[0] + text[1]` (or
        `prompt_ids`), where `text[0]` is a shared lead (a chat's system message) that prefix
        sharing may fork, and the rest is this request's own."""
        var = Variable(name="choice")
        items = tuple(sorted(msgspec.structs.asdict(sampling).items()))
        pieces = [Piece("text", text=text[0]), Piece("text", text=text[1])]
        call = SemanticCall(
            "openai",
            [*pieces, Piece("output", var=var, sampling=items)],
            model=engine.model_name,
            prompt_ids=prompt_ids,
            program=None if hints.session is None else program_of(hints.session),
            samples=req.n or 1,
        )
        if hints.session is not None:
            call.retain_s = (
                self.config.default_retain_s if hints.retain_s is None else hints.retain_s
            )
        call.objective = hints.objective or LATENCY
        return call, var

    def _hints(self, header: str | None, hints: ParrotHints | None) -> ParrotHints:
        hints = hints or ParrotHints()
        if hints.session is None and header is not None:
            if not 0 < len(header) <= 256 or not header.isprintable():
                raise BadRequestError(f"{SESSION_HEADER}: must be 1 to 256 printable characters")
            hints = msgspec.structs.replace(hints, session=header)
        return hints

    async def _respond(self, request: web.Request, prepared: Prepared) -> web.StreamResponse:
        """The HTTP answer: one JSON body, or server-sent events when streamed (an error
        before the first token is a plain error answer; after it, an error event)."""
        if not prepared.req.stream:
            return json_response(await self.complete(prepared))
        async with contextlib.aclosing(self.chunks(prepared)) as chunks:
            first = await anext(chunks)  # raises the call's error before anything is sent
            resp = web.StreamResponse(headers=SSE_HEADERS)
            await resp.prepare(request)
            await resp.write(_event(first))
            async for chunk in chunks:
                await resp.write(_event(chunk))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

    async def complete(self, prepared: Prepared) -> Completion | ChatCompletion:
        """Submit a prepared request and wait for its whole answer. Raises the `ParrotError`
        that failed the call; cancelling the wait cancels the call."""
        call, var = prepared.call, prepared.var
        objective = call.objective or LATENCY
        self.runtime.admit(call)
        self.runtime.submit(call)
        try:
            await var.get(perf=objective)
        except CallError as exc:
            raise _root(exc) from None
        finally:
            var.cancel()  # the client went away: its call stops (a no-op once resolved)
        result = call.results[0]
        if result.completion_tokens:
            self.metrics.ttft.observe(result.ttft_s)
        return prepared.fmt.whole(call.results, self._usage(call))

    async def chunks(self, prepared: Prepared) -> AsyncGenerator[Any, None]:
        """Submit a prepared request and yield its streamed chunks (OpenAI's chunk shapes; the
        usage chunk when `stream_options.include_usage`). Raises the `ParrotError` that failed
        the call if it fails before its first token; a later failure is the last item, as
        OpenAI's error shape (`{"error": {...}}`). Closing the iterator cancels the call."""
        call, var, fmt = prepared.call, prepared.var, prepared.fmt
        opts = prepared.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        self.runtime.admit(call)  # refused before a listener exists that would be left behind
        queue: asyncio.Queue[tuple[TokenDelta, int] | None] = asyncio.Queue()
        stop = self.runtime.tap.listen(var, lambda delta, i: queue.put_nowait((delta, i)))
        start = clock.now()
        self.runtime.submit(call)
        getter = asyncio.ensure_future(var.get(perf=call.objective or LATENCY))
        getter.add_done_callback(lambda _: queue.put_nowait(None))
        getter.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            item = await queue.get()
            if item is None:  # over before its first token: a plain error
                try:
                    await getter
                except CallError as exc:
                    raise _root(exc) from None
            self.metrics.ttft.observe(clock.now() - start)
            for chunk in fmt.opening(call.samples):
                yield chunk
            while item is not None:
                delta, index = item
                for chunk in fmt.piece(delta, index):
                    yield chunk
                if delta.finish_reason is not None:
                    for chunk in fmt.closing(delta.finish_reason, index):
                        yield chunk
                item = await queue.get()
            error = getter.exception()
            if error is not None:  # after the first chunk: the error travels as an item
                yield openai_error(_root(error))
            elif include_usage:
                yield fmt.usage(self._usage(call))
        finally:
            stop()
            var.cancel()  # the client went away: its call stops (a no-op once resolved)

    def _usage(self, call: SemanticCall) -> Usage:
        prompt = call.results[0].prompt_tokens if call.results else call.prompt_tokens
        completion = sum(r.completion_tokens for r in call.results)
        self.metrics.tokens.labels("prompt").inc(prompt)
        self.metrics.tokens.labels("completion").inc(completion)
        details = PromptTokensDetails(cached_tokens=call.cached_tokens)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=details,
        )


@dataclass
class Prepared:
    """An OpenAI request turned into a call: the request, its call and output variable, and
    the format of its answer."""

    req: CompletionRequest | ChatRequest
    call: SemanticCall
    var: Variable
    fmt: Format


def program_of(session: str) -> str:
    """The program of a hint session's requests (Parrot sessions are "session:<id>", so the
    two APIs never share one)."""
    return f"openai:{session}"


def _event(obj: Any) -> bytes:
    return sse_event(msgspec.json.encode(obj))


def _root(exc: BaseException) -> ParrotError:
    """The error that failed a call: the innermost `ParrotError` under its `CallError`s (so a
    prompt too long is a 400 and a dead engine a 503, as the engine said)."""
    found = exc if isinstance(exc, ParrotError) else CallError(repr(exc))
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, ParrotError) and not isinstance(cur, CallError):
            return cur
        cur = cur.__cause__
    return found


def _token_text(engine: EngineClient) -> Any:
    return lambda token: engine.detokenize([token])


def _system_head(
    engine: EngineClient,
    messages: list[dict[str, Any]],
    prompt: str,
    tools: list[dict[str, Any]] | None,
) -> str:
    """The rendered system message (with the tools offered) that starts `prompt`, shared by
    every request with the same system message and tools, so prefix sharing may fork it; ""
    without one."""
    lead = messages[:1] if messages and messages[0]["role"] == "system" else []
    if len(lead) == len(messages) or not (lead or tools):
        return ""
    try:
        alone = engine.render_chat(lead, tools)
    except InvalidRequestError:  # a template that refuses a conversation without a user turn
        return ""
    n = 0
    while n < min(len(alone), len(prompt)) and alone[n] == prompt[n]:
        n += 1
    return prompt[:n]


def _sampling(
    req: CompletionRequest | ChatRequest, max_tokens: int, logprobs: int | None
) -> SamplingParams:
    """Engine sampling from an OpenAI request (OpenAI's defaults: temperature 1, top_p 1).
    Raises `InvalidRequestError` (400) for values the engines refuse."""
    stop = req.stop
    grammar = _grammar(req.response_format)
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_tokens=max_tokens,
        stop=() if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
        seed=req.seed,
        logprobs=logprobs,
        grammar=grammar,
    )
    return check_sampling(params)


def _grammar(fmt: ResponseFormat | None) -> Grammar | None:
    """The constraint of a `response_format`, compiled once here so that a schema that is
    not JSON Schema is a 400 before anything is scheduled. Raises `BadRequestError`."""
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise BadRequestError("response_format.json_schema: only with type 'json_schema'")
        return None
    if fmt.type == "json_object":
        grammar = Grammar(json_object=True)
    elif fmt.json_schema is None or fmt.json_schema.schema is None:
        raise BadRequestError(
            "response_format.json_schema.schema: required with type 'json_schema'"
        )
    else:
        grammar = Grammar(json_schema=json.dumps(fmt.json_schema.schema))
    try:
        compile_grammar(grammar)
    except InvalidRequestError as exc:
        raise BadRequestError(f"response_format: {exc}") from None
    return grammar


def _tools(req: ChatRequest) -> tuple[list[dict[str, Any]], ToolChoice]:
    """The request's tools (OpenAI dicts) and its tool choice: "none", "auto", "required" or
    `Named(tool)` ("auto" by default with tools, "none" without).
    Raises `BadRequestError` naming the field: a tool choice without tools, a named tool
    that is not offered, two tools of one name, a parameters schema that does not compile,
    or `response_format` beside a tool choice other than "none"."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise BadRequestError("tool_choice: needs tools (none were given)")
        return [], "none"
    names = [t.function.name for t in req.tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise BadRequestError(f"tools[{i}].function.name={name!r}: two tools of that name")
    for i, tool in enumerate(req.tools):
        params = tool.function.parameters
        if params is None:
            continue
        if params.get("type", "object") != "object":
            raise BadRequestError(
                f"tools[{i}].function.parameters: the type must be 'object', not "
                f"{params.get('type')!r}"
            )
        try:
            compile_grammar(Grammar(json_schema=json.dumps(params)))
        except InvalidRequestError as exc:
            raise BadRequestError(f"tools[{i}].function.parameters: {exc}") from None
    chosen: ToolChoice = "auto" if choice is None else choice if isinstance(choice, str) else ""
    if isinstance(choice, NamedToolChoice):
        chosen = Named(choice.function.name)
        if chosen.name not in names:
            raise BadRequestError(
                f"tool_choice.function.name={chosen.name!r}: not among the tools {names}"
            )
    fmt = req.response_format
    if chosen != "none" and fmt is not None and fmt.type != "text":
        raise BadRequestError(
            f"response_format={fmt.type!r}: not with tools unless tool_choice is 'none'"
        )
    offered = [
        {"type": "function", "function": _set_fields(msgspec.to_builtins(t.function))}
        for t in req.tools
    ]
    return offered, chosen


def _set_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without its unset (None) fields: they would only lengthen the prompt."""
    return {k: v for k, v in obj.items() if v is not None}


def _tool_grammar(
    tools: list[dict[str, Any]], choice: ToolChoice, parallel: bool | None
) -> Grammar:
    """The compiled constraint of a tool choice (see `tool_format.tool_grammar`)."""
    grammar = tool_grammar(tools, choice, parallel=parallel is not False)
    assert grammar is not None, "only 'none' has no grammar"
    try:
        compile_grammar(grammar)
    except InvalidRequestError as exc:
        raise BadRequestError(f"tools: {exc}") from None
    return grammar


def _check_neutral(req: CompletionRequest | ChatRequest) -> None:
    """Raise `BadRequestError` for accepted-but-unimplemented fields with a non-neutral value."""
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(req, field) not in (None, 0):
            raise BadRequestError(f"{field}={getattr(req, field)}: only 0 is supported")
    if req.logit_bias:
        raise BadRequestError("logit_bias: not supported (send {} or leave it out)")


def _check_unsupported(req: CompletionRequest | ChatRequest, **neutral: object) -> None:
    for field, value in neutral.items():
        got = getattr(req, field)
        if got is not None and got != value:
            raise BadRequestError(f"{field}={got!r}: not supported (leave it out)")
