"""Per-call context carried in contextvars: set by interceptors, read by logs and the outbox."""

from __future__ import annotations

from contextvars import ContextVar

correlation_id: ContextVar[str] = ContextVar("correlation_id", default="")
merchant_id: ContextVar[str] = ContextVar("merchant_id", default="")
# The raw bearer token of the current call, forwarded on calls to other services.
bearer_token: ContextVar[str] = ContextVar("bearer_token", default="")
