"""LangChain chat model over parrot_actors: `ChatParrot`, embedded (`runtime=`, a started
`pa.Runtime` in this process) or remote (`url=`, `api_key=`). Needs the `langchain` extra.

Every call is an OpenAI chat completion request served as a Parrot call (see
`server.openai_api`): the same scheduler, prefix sharing, constrained tool calls and
structured output. Remote calls go over HTTP to `/v1/chat/completions`; embedded calls go
straight to the same request handling (`OpenAIAPI.prepare_chat` / `complete` / `chunks`), no
HTTP. The app hints of the OpenAI path ride along: `session` (the program a call belongs to:
its turns are scheduled by the session's attained service and keep their KV between calls),
`objective` ("latency" or "throughput") and `retain_s`, as fields, per call
(`.bind(session=...)` or `invoke(..., session=...)`), or from the run's config
(`{"configurable": {"session": ...}}`; LangGraph's `thread_id` is the session when nothing
else names one).

Sync methods run the async ones: on the runtime's event loop (from another thread; inside
that loop use the async methods) or, remote, on a private loop thread.

Sources: LangChain's custom chat model guide (python.langchain.com, "How to create a custom
chat model class": `BaseChatModel._generate` / `_agenerate` / `_stream` / `_astream`,
`bind_tools`); OpenAI's chat completions API for the wire shapes.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, Literal, TypeVar

import aiohttp
import msgspec
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    convert_to_openai_messages,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.runnables.config import RunnableConfig, ensure_config
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from parrot_actors.errors import InvalidRequestError, ParrotError
from parrot_actors.runtime import Runtime
from parrot_actors.server.config import ServerConfig
from parrot_actors.server.errors import exception_from
from parrot_actors.server.metrics import Metrics
from parrot_actors.server.openai_api import OpenAIAPI
from parrot_actors.server.protocol import ChatRequest, ErrorBody
from parrot_actors.server.router import EngineRouter

T = TypeVar("T")


class ChatParrot(BaseChatModel):
    """A LangChain chat model served by parrot_actors.

    Exactly one of `url` (a running service; `api_key` its key, if it has one) or `runtime` (a
    started embedded `pa.Runtime`). model: a served model name or alias ("default": the first
    engine's). temperature, top_p, max_tokens (tokens), seed, stop: sampling, as OpenAI takes
    them (None: the service's defaults; greedy at temperature 0). session, objective
    ("latency" | "throughput"), retain_s (seconds): the app hints (module docstring).
    timeout_s: the longest wait for one answer (seconds).

    Raises `InvalidRequestError` at construction without exactly one of url / runtime, and
    the service's typed errors (`ParrotError` subclasses: 400s as `BadRequestError` or
    `InvalidRequestError`, an unknown model as `NotFoundError`) from its calls.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    url: str | None = None
    api_key: str | None = None
    runtime: Runtime | None = Field(default=None, exclude=True)
    model: str = Field(default="default", alias="model_name")
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    session: str | None = None
    objective: Literal["latency", "throughput"] | None = None
    retain_s: float | None = None
    timeout_s: float = 600.0

    _api: OpenAIAPI | None = PrivateAttr(default=None)
    _loop: asyncio.AbstractEventLoop | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_backend(self) -> ChatParrot:
        if (self.url is None) == (self.runtime is None):
            raise InvalidRequestError(
                "ChatParrot needs exactly one of url= (a running service) or runtime= "
                "(a started pa.Runtime)"
            )
        if self.runtime is not None:
            try:  # the runtime's loop, for sync calls from other threads
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None
        return self

    @property
    def _llm_type(self) -> str:
        return "parrot"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "url": self.url, "temperature": self.temperature}

    # ---- the run config's hints reach the request ------------------------------------------

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """`BaseChatModel.invoke`, with the hints of `config["configurable"]`."""
        return super().invoke(input, config, stop=stop, **_configured(config, kwargs))

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """`BaseChatModel.ainvoke`, with the hints of `config["configurable"]`."""
        return await super().ainvoke(input, config, stop=stop, **_configured(config, kwargs))

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        """`BaseChatModel.stream`, with the hints of `config["configurable"]`."""
        return super().stream(input, config, stop=stop, **_configured(config, kwargs))

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        """`BaseChatModel.astream`, with the hints of `config["configurable"]`."""
        return super().astream(input, config, stop=stop, **_configured(config, kwargs))

    # ---- tools and structured output ------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """This model with `tools` (anything `convert_to_openai_tool` takes: pydantic models,
        functions, LangChain tools, OpenAI dicts) offered on every call. tool_choice: "auto",
        "none", "required" (also "any" or True), a tool's name, or an OpenAI choice dict;
        with one tool, "required" names it (one call, not several)."""
        specs = [convert_to_openai_tool(t) for t in tools]
        names = [s["function"]["name"] for s in specs]
        choice: Any = tool_choice
        if choice in ("any", True):
            choice = "required"
        if choice == "required" and len(specs) == 1:
            choice = names[0]
        if isinstance(choice, str) and choice not in ("auto", "none", "required"):
            choice = {"type": "function", "function": {"name": choice}}
        extra: dict[str, Any] = {"tools": specs}
        if choice not in (None, False):
            extra["tool_choice"] = choice
        if parallel_tool_calls is not None:
            extra["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(**extra, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_schema"] = "function_calling",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers parsed into `schema` (a pydantic model, a TypedDict, or a JSON Schema
        dict): by a forced tool call ("function_calling", LangChain's default), or by the
        answer itself constrained to the schema ("json_schema", OpenAI's `response_format`)."""
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if include_raw:
            raise InvalidRequestError(
                "with_structured_output(method='json_schema'): no include_raw"
            )
        spec = convert_to_openai_tool(schema)["function"]
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": spec["name"], "schema": spec.get("parameters", {})},
        }
        llm = self.bind(response_format=fmt, **kwargs)
        if isinstance(schema, type) and hasattr(schema, "model_validate_json"):
            return llm | PydanticOutputParser(pydantic_object=schema)
        return llm | JsonOutputParser()

    # ---- the request ----------------------------------------------------------------------

    def _body(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """The OpenAI chat completion request of one call (hints included). The run's
        `configurable` comes from the config of the call (`_configured`) or, inside a graph
        (LangGraph sets it for its nodes), from the current run config."""
        kwargs = dict(kwargs)
        kwargs.pop("ls_structured_output_format", None)
        configurable = {
            **ensure_config().get("configurable", {}),
            **kwargs.pop(_CONFIGURABLE, {}),
        }
        session = (
            kwargs.pop("session", None)
            or configurable.get("session")
            or self.session
            or configurable.get("thread_id")
        )
        objective = kwargs.pop("objective", None) or configurable.get("objective") or self.objective
        retain_s = kwargs.pop("retain_s", None)
        if retain_s is None:
            retain_s = configurable.get("retain_s", self.retain_s)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": convert_to_openai_messages(messages),
        }
        for key in ("temperature", "top_p", "max_tokens", "seed"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        stops = stop if stop is not None else self.stop
        if stops:
            body["stop"] = list(stops)
        body.update(kwargs)
        parrot: dict[str, Any] = {}
        if session is not None:
            parrot["session"] = str(session)
        if objective is not None:
            parrot["objective"] = objective
        if retain_s is not None:
            parrot["retain_s"] = retain_s
        if parrot:
            body["parrot"] = parrot
        return body

    async def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.runtime is not None:
            api = self._embedded()
            prepared = api.prepare_chat(_request(body))
            result = await asyncio.wait_for(api.complete(prepared), self.timeout_s)
            return msgspec.to_builtins(result)  # type: ignore[no-any-return]
        async with aiohttp.ClientSession(timeout=self._timeout()) as http:
            async with http.post(
                f"{self._base()}/v1/chat/completions", json=body, headers=self._headers()
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise error_of_answer(resp.status, raw)
                return json.loads(raw)  # type: ignore[no-any-return]

    async def _chunks(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        if self.runtime is not None:
            api = self._embedded()
            prepared = api.prepare_chat(_request(body))
            gen = api.chunks(prepared)
            try:
                while True:
                    try:
                        chunk = await asyncio.wait_for(anext(gen), self.timeout_s)
                    except StopAsyncIteration:
                        return
                    item = msgspec.to_builtins(chunk)
                    _raise_event_error(item)
                    yield item
            finally:
                await gen.aclose()
        async with aiohttp.ClientSession(timeout=self._timeout()) as http:
            async with http.post(
                f"{self._base()}/v1/chat/completions", json=body, headers=self._headers()
            ) as resp:
                if resp.status >= 400:
                    raise error_of_answer(resp.status, await resp.read())
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[len(b"data: ") :].strip()
                    if data == b"[DONE]":
                        return
                    item = json.loads(data)
                    _raise_event_error(item)
                    yield item

    def _embedded(self) -> OpenAIAPI:
        if self._api is None:
            assert self.runtime is not None, "validated at construction"
            runtime = self.runtime
            self._api = OpenAIAPI(
                runtime, EngineRouter(runtime), ServerConfig(), Metrics(runtime, lambda: 0)
            )
        return self._api

    def _base(self) -> str:
        assert self.url is not None, "validated at construction"
        return self.url.rstrip("/")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.timeout_s)

    # ---- LangChain's hooks ----------------------------------------------------------------

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await self._agenerate_body(self._body(messages, stop, kwargs))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        body = self._body(messages, stop, kwargs)  # reads this thread's run config
        return self._sync(self._agenerate_body(body))

    async def _agenerate_body(self, body: dict[str, Any]) -> ChatResult:
        answer = await self._answer(body)
        usage = answer.get("usage") or {}
        return ChatResult(
            generations=[
                ChatGeneration(
                    message=_message(choice["message"], usage if i == 0 else {}),
                    generation_info={"finish_reason": choice.get("finish_reason")},
                )
                for i, choice in enumerate(answer["choices"])
            ],
            llm_output={"model_name": answer.get("model"), "usage": usage},
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for item in self._chunks(self._body(messages, stop, kwargs)):
            chunk = _chunk(item)
            if chunk is None:
                continue
            if run_manager is not None and isinstance(chunk.message.content, str):
                await run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        loop = self._sync_loop()
        gen = self._chunks(self._body(messages, stop, kwargs))
        try:
            while True:
                try:
                    item = asyncio.run_coroutine_threadsafe(_next(gen), loop).result()
                except StopAsyncIteration:
                    return
                chunk = _chunk(item)
                if chunk is None:
                    continue
                if run_manager is not None and isinstance(chunk.message.content, str):
                    run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
                yield chunk
        finally:
            asyncio.run_coroutine_threadsafe(gen.aclose(), loop).result()

    # ---- sync over async ------------------------------------------------------------------

    def _sync_loop(self) -> asyncio.AbstractEventLoop:
        """The loop sync calls run on. Raises `InvalidRequestError` when called from inside
        that loop (it would wait on itself) or when the embedded runtime's loop is unknown."""
        if self.runtime is not None:
            loop = self._loop
            if loop is None:
                raise InvalidRequestError(
                    "ChatParrot(runtime=...) was built outside the runtime's event loop: build "
                    "it inside (or use the async methods)"
                )
        else:
            loop = _private_loop()
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            raise InvalidRequestError(
                "ChatParrot: a sync call inside its own event loop would wait on itself; use "
                "ainvoke / astream / abatch there"
            )
        return loop

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            loop = self._sync_loop()
        except BaseException:
            coro.close()
            raise
        return asyncio.run_coroutine_threadsafe(coro, loop).result()


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _private_loop() -> asyncio.AbstractEventLoop:
    """One event loop on a daemon thread, for remote sync calls of every `ChatParrot`."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="chat-parrot", daemon=True).start()
            _LOOP = loop
        return _LOOP


_CONFIGURABLE = "parrot_configurable"
"""The keyword that carries a call's `config["configurable"]` down to `_body`."""


def _configured(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` plus the call config's `configurable` (its session, objective, retain_s and
    LangGraph's thread_id are hints)."""
    configurable = (config or {}).get("configurable") or {}
    return {**kwargs, _CONFIGURABLE: dict(configurable)} if configurable else kwargs


async def _next(gen: AsyncGenerator[T, None]) -> T:
    return await anext(gen)


def _request(body: dict[str, Any]) -> ChatRequest:
    """`body` as a `ChatRequest`, checked as the HTTP path checks it. Raises
    `InvalidRequestError` naming the field."""
    try:
        return msgspec.convert(body, ChatRequest)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"invalid request: {exc}") from None


def error_of_answer(status: int, raw: bytes) -> ParrotError:
    """The typed error of an OpenAI-shaped error answer."""
    try:
        return _exception(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return ParrotError(f"HTTP {status}: {raw[:500].decode(errors='replace')}")


def _exception(error: dict[str, Any]) -> ParrotError:
    """The typed error of OpenAI's error body (`code` is this service's error class)."""
    return exception_from(ErrorBody(type=str(error["code"]), message=str(error["message"])))


def _raise_event_error(item: dict[str, Any]) -> None:
    """Raise the typed error of a streamed error event (a failure after the first chunk)."""
    if "error" in item and "choices" not in item:
        raise _exception(item["error"])


def _usage(usage: dict[str, Any]) -> dict[str, Any] | None:
    if not usage:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": usage["prompt_tokens"],
        "output_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "input_token_details": {"cache_read": cached},
    }


def _message(message: dict[str, Any], usage: dict[str, Any]) -> AIMessage:
    """An OpenAI assistant message as an `AIMessage` (tool calls parsed; usage attached)."""
    calls = []
    invalid = []
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        try:
            calls.append(
                {"name": fn["name"], "args": json.loads(fn["arguments"]), "id": call["id"]}
            )
        except ValueError as exc:  # cut short by max_tokens
            invalid.append(
                {"name": fn["name"], "args": fn["arguments"], "id": call["id"], "error": str(exc)}
            )
    return AIMessage(
        content=message.get("content") or "",
        tool_calls=calls,
        invalid_tool_calls=invalid,
        usage_metadata=_usage(usage),
    )


def _chunk(item: dict[str, Any]) -> ChatGenerationChunk | None:
    """One streamed OpenAI chunk as a `ChatGenerationChunk` (None when it adds nothing)."""
    if not item.get("choices"):
        usage = _usage(item.get("usage") or {})
        if usage is None:
            return None
        # The one chunk that names the model (LangChain merges response_metadata of chunks).
        meta = {"model_name": item.get("model")}
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=usage,  # type: ignore[arg-type]
                response_metadata=meta,
            )
        )
    choice = item["choices"][0]
    delta = choice.get("delta") or {}
    chunks = [
        tool_call_chunk(
            name=(d.get("function") or {}).get("name"),
            args=(d.get("function") or {}).get("arguments"),
            id=d.get("id"),
            index=d.get("index"),
        )
        for d in delta.get("tool_calls") or []
    ]
    finish = choice.get("finish_reason")
    info = {"finish_reason": finish} if finish else None
    message = AIMessageChunk(
        content=delta.get("content") or "",
        tool_call_chunks=chunks,
        response_metadata=info or {},
    )
    return ChatGenerationChunk(message=message, generation_info=info)
