"""API keys: who may use the service at all (sessions then keep tenants apart).

With `ServerConfig.api_key` set, every `/v1/*` route (the Parrot API and the OpenAI one) needs
the key; with `metrics_key` set, `/health` and `/metrics` need that one. A key travels as
`X-Api-Key: <key>` or as `Authorization: Bearer <key>` (what the `openai` client sends); routes
of a session carry the session token in `Authorization`, so there the key goes in `X-Api-Key`.
Keys are compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from parrot_actors.server.errors import ApiKeyError


def _offered(request: web.Request) -> list[str]:
    keys = [request.headers.get("X-Api-Key", "")]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        keys.append(token.strip())
    return [k for k in keys if k]


def _accepts(request: web.Request, key: str) -> bool:
    want = key.encode()
    # Every offered value is compared, so the time taken does not depend on which one matched.
    return sum(hmac.compare_digest(k.encode(), want) for k in _offered(request)) > 0


def auth_middleware(api_key: str | None, metrics_key: str | None) -> Middleware:
    """An aiohttp middleware enforcing `api_key` on /v1/* and `metrics_key` on /health and
    /metrics (None: that part is open). Raises `ApiKeyError` (401), which names the header to
    send but never echoes what was sent."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
            key, what = api_key, "API key"
        elif path in ("/health", "/metrics"):
            key, what = metrics_key, "metrics key"
        else:
            key, what = None, ""
        if key is not None and not _accepts(request, key):
            raise ApiKeyError(
                f"{request.method} {path} needs the service's {what}: send "
                "'Authorization: Bearer <key>' or 'X-Api-Key: <key>' (on session routes, "
                "X-Api-Key)"
            )
        return await handler(request)

    return check
