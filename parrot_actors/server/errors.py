"""Errors of the service and their HTTP mapping, in both directions.

Every `ParrotError` a request can cause maps to a 4xx status with a JSON body
`{"error": {"type": ..., "message": ..., "cause": {...}}}` (the cause chain of a `CallError`
travels along), and the client rebuilds the same exception classes from it. Nothing a client
sends may produce a 5xx: only engine failures (503) and bugs (500) do.
"""

from __future__ import annotations

import re

from parrot_actors import errors as core_errors
from parrot_actors.errors import (
    CallError,
    CapacityError,
    ContextNotFoundError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    ParrotError,
    SessionError,
    TemplateError,
)
from parrot_actors.server.protocol import ErrorBody, OpenAIErrorBody, OpenAIErrorResponse
from parrot_actors.variables.variable import VariableError


class BadRequestError(ParrotError):
    """The request is malformed: bad JSON, wrong types, unknown fields, bad query values."""


class PayloadTooLargeError(BadRequestError):
    """The request body is over the server's size limit (bytes)."""


class UnauthorizedError(SessionError):
    """No bearer token, or one that names no live session (never created, deleted, expired)."""


class ApiKeyError(UnauthorizedError):
    """The request lacks the service's API key (or metrics key), or carries a wrong one."""


class NotFoundError(ParrotError):
    """A resource the session does not hold: a variable id, a route, a model."""


class ConflictError(ParrotError):
    """The request contradicts the state: a variable id already in use, set twice."""


class TooManyPendingError(SessionError):
    """The session is at its limit of pending calls (or variables, or the server of sessions)."""


class GetTimeoutError(ParrotError):
    """A variable did not resolve within the requested timeout (seconds)."""


class ServiceUnavailableError(ParrotError):
    """The service is shutting down or an engine failed (not the client's fault)."""


# Most specific first: the first class an error is an instance of decides its status.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (PayloadTooLargeError, 413),
    (BadRequestError, 400),
    (UnauthorizedError, 401),
    (TooManyPendingError, 429),
    (OverloadedError, 429),
    (NotFoundError, 404),
    (ConflictError, 409),
    (VariableError, 409),
    (GetTimeoutError, 504),
    (ServiceUnavailableError, 503),
    (TemplateError, 422),
    (CallError, 409),
    (InvalidRequestError, 400),
    (CapacityError, 400),
    (ContextNotFoundError, 404),
    (EngineError, 503),
    (SessionError, 400),
    (ParrotError, 400),
)

_CLASSES: dict[str, type[ParrotError]] = {
    cls.__name__: cls
    for cls in (
        *(
            c
            for c in vars(core_errors).values()
            if isinstance(c, type) and issubclass(c, ParrotError)
        ),
        VariableError,
        BadRequestError,
        PayloadTooLargeError,
        UnauthorizedError,
        ApiKeyError,
        NotFoundError,
        ConflictError,
        TooManyPendingError,
        GetTimeoutError,
        ServiceUnavailableError,
    )
}

MAX_CAUSE_DEPTH = 8
"""Links of a cause chain sent over the wire (a longer chain is cut)."""


def status_of(exc: BaseException) -> int:
    """The HTTP status for an error raised while serving a request (500 for non-Parrot ones)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: BaseException, depth: int = MAX_CAUSE_DEPTH) -> ErrorBody:
    """The wire form of `exc` and its `__cause__` chain (at most `depth` links)."""
    cause = exc.__cause__
    return ErrorBody(
        type=type(exc).__name__,
        message=str(exc),
        cause=error_body(cause, depth - 1) if cause is not None and depth > 1 else None,
    )


def exception_from(body: ErrorBody) -> ParrotError:
    """Rebuild the exception (and its cause chain) of an `ErrorBody`; unknown types become
    `ParrotError` with the type name in the message."""
    cls = _CLASSES.get(body.type)
    exc = cls(body.message) if cls is not None else ParrotError(f"{body.type}: {body.message}")
    if body.cause is not None:
        exc.__cause__ = exception_from(body.cause)
    return exc


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
_OPENAI_TYPES |= {404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error"}
_OPENAI_TYPES |= {422: "invalid_request_error", 429: "rate_limit_error", 504: "timeout_error"}
_PARAM = re.compile(r"at `\$\.([^`]+)`")


def openai_error(exc: BaseException) -> OpenAIErrorResponse:
    """`exc` in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`): the
    type follows the HTTP status (`status_of`), the code is this service's error class, and
    the param is the request field a validation message names, if any."""
    status = status_of(exc)
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    found = _PARAM.search(str(exc))
    return OpenAIErrorResponse(
        error=OpenAIErrorBody(
            message=str(exc),
            type=kind,
            param=found.group(1) if found else None,
            code=type(exc).__name__,
        )
    )
