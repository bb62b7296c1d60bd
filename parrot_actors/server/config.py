"""Service configuration."""

from __future__ import annotations

import msgspec

from parrot_actors.errors import InvalidRequestError


class ServerConfig(msgspec.Struct, kw_only=True):
    """Where the service listens and the limits that keep one client from hurting others.

    host / port: the listening address (port 0 picks a free one). max_body_bytes: largest
    request body (bytes; 413 beyond). session_ttl_s / max_session_ttl_s: default and largest
    inactivity timeout of a session (seconds). max_sessions: live sessions at most (429).
    max_pending_calls: unfinished calls per session (429). max_variables: variables per session.
    max_get_timeout_s: longest server-side wait of one GET (seconds; 504 after the requested
    timeout). default_get_timeout_s: the wait when the request names none.
    reap_interval_s: how often idle sessions are looked for (seconds). teardown_s: how long a
    session's end waits for its cancelled calls to free their contexts (seconds).
    default_max_tokens: `max_tokens` of a chat completion that sets none (tokens).
    default_retain_s: how long an OpenAI request's context is kept for its session's next
    request when it names a session but no `retain_s` (seconds).
    api_key: when set, every /v1/* route needs it, as `Authorization: Bearer <key>` or
    `X-Api-Key: <key>` (session routes carry the session token in `Authorization`, so the key
    goes in `X-Api-Key` there); 401 otherwise. metrics_key: when set, /health and /metrics need
    it the same way (else they are open: aggregate counters reveal traffic, so multi-tenant
    deployments set it).
    """

    host: str = "127.0.0.1"
    port: int = 9000
    max_body_bytes: int = 1 << 20
    session_ttl_s: float = 600.0
    max_session_ttl_s: float = 86400.0
    max_sessions: int = 1024
    max_pending_calls: int = 1024
    max_variables: int = 100_000
    max_get_timeout_s: float = 3600.0
    default_get_timeout_s: float = 300.0
    reap_interval_s: float = 1.0
    teardown_s: float = 10.0
    default_max_tokens: int = 256
    default_retain_s: float = 30.0
    api_key: str | None = None
    metrics_key: str | None = None

    def validate(self) -> ServerConfig:
        """Return self, or raise `InvalidRequestError` naming the bad field."""
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError(f"port={self.port}: must be in [0, 65535]")
        for name in (
            "max_body_bytes",
            "session_ttl_s",
            "max_session_ttl_s",
            "max_sessions",
            "max_pending_calls",
            "max_variables",
            "max_get_timeout_s",
            "reap_interval_s",
            "default_max_tokens",
        ):
            if not getattr(self, name) > 0:
                raise InvalidRequestError(f"{name}={getattr(self, name)!r}: must be > 0")
        for name in ("api_key", "metrics_key"):
            key = getattr(self, name)
            if key is not None and (len(key) < 8 or not key.isprintable() or " " in key):
                raise InvalidRequestError(
                    f"{name}: must be at least 8 printable characters without spaces"
                )
        return self
