"""Typed errors of parrot_actors. Every error a user can cause is a subclass of `ParrotError`.

Each message names the bad value and what is allowed, so a client can fix its request without
reading server logs.
"""

from __future__ import annotations


class ParrotError(Exception):
    """Base class of every error parrot_actors raises on purpose."""


class TemplateError(ParrotError):
    """A semantic function's template or its call graph is malformed (raised at decoration or
    submission time)."""


class CallError(ParrotError):
    """A semantic call failed; raised by every variable downstream of it, chained to the cause."""


class EngineError(ParrotError):
    """An engine rejected a request (unknown context, bad sampling parameters, too long a
    context) or died while serving it."""


class InvalidRequestError(EngineError):
    """A request's arguments are outside what the engine accepts (the message says which)."""


class ContextNotFoundError(EngineError):
    """A context id that the engine does not hold (never created, or already freed)."""


class EngineDiedError(EngineError):
    """The engine serving a request died (process or actor lost). The scheduler may retry the
    call on another engine when nothing of it has been delivered yet."""


class SamplingError(EngineError):
    """Picking, detokenizing or streaming one request's next token failed (e.g. NaN logits);
    that request fails, the engine and every other request go on."""


class CapacityError(EngineError):
    """A single request can never fit in the engine's KV cache or model length, even alone."""


class SessionError(ParrotError):
    """A service session is unknown, expired, or over its limits."""


class OverloadedError(ParrotError):
    """The service would not serve this request within its bound: a latency request whose
    predicted wait is over the tenant's `max_latency_wait_s`, or a tenant's throughput queue at
    `max_queued_throughput` (HTTP 429). `retry_after_s`: when to try again (seconds, >= 1, from
    the engines' step-time models)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = max(1.0, float(retry_after_s))
