"""HTTP plumbing shared by the handlers: JSON bodies in and out, query values, SSE, errors.

Every failure here is a typed `ParrotError`; the error middleware turns it into a 4xx JSON
answer that names the problem.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TypeVar

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from parrot_actors.errors import OverloadedError, ParrotError
from parrot_actors.server.errors import (
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    error_body,
    openai_error,
    status_of,
)
from parrot_actors.server.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("parrot_actors.server")

T = TypeVar("T")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def json_response(obj: object, status: int = 200) -> web.Response:
    """`obj` (a msgspec struct or plain data) as a JSON response."""
    return web.Response(
        body=msgspec.json.encode(obj), status=status, content_type="application/json"
    )


def error_response(status: int, body: ErrorBody) -> web.Response:
    """The JSON error answer `{"error": {...}}` with `status`."""
    return json_response(ErrorResponse(error=body), status=status)


async def read_body(
    request: web.Request, type_: type[T], limit: int, allow_empty: bool = False
) -> T:
    """Decode the request body (JSON) as `type_`. An empty body decodes as `{}` when
    `allow_empty`. Raises `PayloadTooLargeError` over `limit` bytes and `BadRequestError`
    naming the field for malformed JSON, wrong types or unknown fields."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(
            f"request body of {request.content_length} bytes is over the limit of {limit} bytes"
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes") from exc
    if not raw.strip() and allow_empty:
        raw = b"{}"
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"malformed JSON body: {exc}") from None


def query_float(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    """The query parameter `name` as a float in [lo, hi] (default when absent). Raises
    `BadRequestError` naming it otherwise."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:
        raise BadRequestError(f"query parameter {name}={raw!r}: must be a number in [{lo}, {hi}]")
    return value


def query_choice(request: web.Request, name: str, default: str, choices: tuple[str, ...]) -> str:
    """The query parameter `name`, one of `choices`. Raises `BadRequestError` otherwise."""
    raw = request.query.get(name, default)
    if raw not in choices:
        raise BadRequestError(f"query parameter {name}={raw!r}: allowed are {list(choices)}")
    return raw


def sse_event(data: bytes, event: str | None = None) -> bytes:
    """One Server-Sent Event frame (`data` must be one line, as JSON is)."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + data + b"\n\n"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON answer: `ParrotError`s by `status_of`, aiohttp's own HTTP
    errors (unknown route 404, wrong method 405, body too large 413) with their status, and
    anything else into a logged 500 (a bug, never the client's input). The OpenAI routes
    answer in OpenAI's error shape (`openai_error`), the others `{"error": ErrorBody}`."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return _answer(request, 404, NotFoundError(f"no route {request.method} {request.path}"))
        if exc.status == 413:
            error = PayloadTooLargeError(exc.text or "request body too large")
            return _answer(request, 413, error)
        return _answer(request, exc.status, ParrotError(exc.text or exc.reason), type(exc).__name__)
    except ParrotError as exc:
        return _answer(request, status_of(exc), exc)
    except asyncio.CancelledError:
        raise
    except (ConnectionResetError, ConnectionError):
        raise
    except Exception as exc:
        log.exception("internal error serving %s %s", request.method, request.path)
        return _answer(request, 500, ParrotError(repr(exc)), "InternalError")


def is_openai_route(path: str) -> bool:
    """True for the routes that answer errors in OpenAI's shape."""
    return path in OPENAI_ROUTES or path.startswith("/v1/parrot/")


OPENAI_ROUTES = frozenset(
    {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
)
"""The OpenAI-compatible routes."""


def _answer(
    request: web.Request, status: int, exc: ParrotError, kind: str | None = None
) -> web.Response:
    if is_openai_route(request.path):
        body = openai_error(exc)
        if kind is not None:
            body = msgspec.structs.replace(
                body, error=msgspec.structs.replace(body.error, code=kind)
            )
        resp = json_response(body, status=status)
    else:
        wire = error_body(exc)
        if kind is not None:
            wire = msgspec.structs.replace(wire, type=kind)
        resp = error_response(status, wire)
    if isinstance(exc, OverloadedError):  # RFC 9110 §10.2.3: whole seconds
        resp.headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
    return resp
