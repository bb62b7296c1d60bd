"""OpenAI-compatible endpoints, so agent frameworks and the request-level baseline use the
service unchanged: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream or
not, usage counts, stop, temperature, top_p, max_tokens, n=1, seed).

Without `serve --api-key` no key is needed; with it, `Authorization: Bearer <key>` (what the
openai client sends). Usage counts are exact: prompt tokens are the tokenizer's length of the
prompt as the engine holds it, completion tokens the tokens generated. A request whose engine
died under it (`EngineDiedError`) before anything was sent is run again once, on a healthy
engine (or on the same one once it is rebuilt).
"""

from __future__ import annotations

import contextlib
import time

import msgspec
from aiohttp import web

from parrot_actors.errors import EngineDiedError, ParrotError
from parrot_actors.messages import LATENCY_PRIORITY, SamplingParams
from parrot_actors.server.calls import check_sampling
from parrot_actors.server.config import ServerConfig
from parrot_actors.server.errors import BadRequestError, error_body
from parrot_actors.server.http import SSE_HEADERS, json_response, read_body, sse_event
from parrot_actors.server.metrics import Metrics
from parrot_actors.server.openai_format import ChatFormat, TextFormat, chat_messages
from parrot_actors.server.protocol import (
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from parrot_actors.server.router import EngineRouter, completion_prompt

DEFAULT_COMPLETION_TOKENS = 16
"""`max_tokens` of a completion that sets none (OpenAI's default)."""


class OpenAIAPI:
    """Handlers of the OpenAI-compatible API."""

    def __init__(self, router: EngineRouter, config: ServerConfig, metrics: Metrics) -> None:
        self.router = router
        self.config = config
        self.metrics = metrics

    def routes(self) -> list[web.RouteDef]:
        """The API's routes."""
        return [
            web.get("/v1/models", self.models),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
        ]

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models."""
        return json_response(ModelList(data=[ModelCard(id=m) for m in self.router.models()]))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        req = await read_body(request, CompletionRequest, self.config.max_body_bytes)
        _check_neutral(req)
        _check_unsupported(req, logprobs=None, echo=False, best_of=1, suffix=None)
        prompt = completion_prompt(req.prompt)
        sampling = _sampling(req, req.max_tokens or DEFAULT_COMPLETION_TOKENS)
        self.router.pick(req.model)  # 404 for an unknown model before anything else
        fmt = TextFormat(req.model)
        return await self._run(request, prompt, sampling, fmt, req)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        req = await read_body(request, ChatRequest, self.config.max_body_bytes)
        _check_neutral(req)
        _check_unsupported(req, logprobs=False, top_logprobs=0)
        max_tokens = req.max_completion_tokens or req.max_tokens or self.config.default_max_tokens
        sampling = _sampling(req, max_tokens)
        # Engines serving one model share its tokenizer and chat template.
        prompt = self.router.pick(req.model).render_chat(chat_messages(req.messages))
        fmt = ChatFormat(req.model)
        return await self._run(request, prompt, sampling, fmt, req)

    async def _run(
        self,
        request: web.Request,
        prompt: str | list[int],
        sampling: SamplingParams,
        fmt: TextFormat | ChatFormat,
        req: CompletionRequest | ChatRequest,
    ) -> web.StreamResponse:
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(request, req.model, prompt, sampling, fmt, include_usage)
        for attempt in range(2):
            engine = self.router.pick(req.model)
            try:
                async with self.router.context(engine, prompt) as (ctx, n_prompt):
                    result = await engine.generate(ctx, sampling, priority=LATENCY_PRIORITY)
                break
            except EngineDiedError:
                if attempt:
                    raise
        usage = self._count(n_prompt, result.completion_tokens)
        if result.completion_tokens:
            self.metrics.ttft.observe(result.ttft_s)
        return json_response(fmt.whole(result.text, result.finish_reason, usage))

    async def _stream(
        self,
        request: web.Request,
        model: str,
        prompt: str | list[int],
        sampling: SamplingParams,
        fmt: TextFormat | ChatFormat,
        include_usage: bool,
    ) -> web.StreamResponse:
        # Fill before answering 200: a prompt the engine refuses is still a plain 4xx, and a
        # fill whose engine died is run again once.
        async with contextlib.AsyncExitStack() as stack:
            for attempt in range(2):
                engine = self.router.pick(model)
                try:
                    ctx, n_prompt = await stack.enter_async_context(
                        self.router.context(engine, prompt)
                    )
                    break
                except EngineDiedError:
                    if attempt:
                        raise
            resp = web.StreamResponse(headers=SSE_HEADERS)
            await resp.prepare(request)
            start = time.perf_counter()
            count, finish = 0, None
            try:
                for chunk in fmt.opening():
                    await resp.write(sse_event(msgspec.json.encode(chunk)))
                stream = engine.generate_stream(ctx, sampling, priority=LATENCY_PRIORITY)
                async for delta in stream:
                    if not count:
                        self.metrics.ttft.observe(time.perf_counter() - start)
                    count += 1
                    finish = delta.finish_reason or finish
                    if delta.text:
                        await resp.write(sse_event(msgspec.json.encode(fmt.piece(delta.text))))
                await resp.write(sse_event(msgspec.json.encode(fmt.closing(finish or "length"))))
                usage = self._count(n_prompt, count)
                if include_usage:
                    await resp.write(sse_event(msgspec.json.encode(fmt.usage(usage))))
            except ParrotError as exc:  # after the 200: the error travels as an event
                body = msgspec.json.encode(ErrorResponse(error=error_body(exc)))
                await resp.write(sse_event(body))
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _count(self, prompt_tokens: int, completion_tokens: int) -> Usage:
        self.metrics.tokens.labels("prompt").inc(prompt_tokens)
        self.metrics.tokens.labels("completion").inc(completion_tokens)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


def _sampling(req: CompletionRequest | ChatRequest, max_tokens: int) -> SamplingParams:
    """Engine sampling from an OpenAI request (OpenAI's defaults: temperature 1, top_p 1).
    Raises `InvalidRequestError` (400) for values the engines refuse."""
    stop = req.stop
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_tokens=max_tokens,
        stop=() if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
        seed=req.seed,
    )
    return check_sampling(params)


def _check_neutral(req: CompletionRequest | ChatRequest) -> None:
    """Raise `BadRequestError` for accepted-but-unimplemented fields with a non-neutral value."""
    if req.n not in (None, 1):
        raise BadRequestError(f"n={req.n}: only n=1 is supported (send one request per choice)")
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
