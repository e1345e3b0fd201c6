"""Settings shared by every service; each service subclasses with its own env prefix.

Defaults work on a developer machine: PostgreSQL on 127.0.0.1:5432 (trust auth),
RabbitMQ on 127.0.0.1:5672 with guest/guest.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Base for `<Service>Settings`; a subclass sets `env_prefix`, e.g. `CATALOG_`."""

    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore", frozen=True)

    service_name: str = "tally"
    version: str = "0.1.0"

    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9101, ge=0, le=65535)
    shutdown_grace_seconds: float = Field(10.0, gt=0)
    # Health reports NOT_SERVING this long before the server stops taking calls, so
    # Kubernetes readiness moves traffic away first.
    shutdown_drain_seconds: float = Field(0.0, ge=0)
    log_level: str = "INFO"

    # PostgreSQL server where new merchant databases are placed and the control database lives.
    pg_host: str = "127.0.0.1"
    pg_port: int = 5432
    pg_user: str = "postgres"
    pg_password: SecretStr = SecretStr("")
    # Prepended to every database name; lets tests and several stacks share one server.
    db_prefix: str = Field("", pattern=r"^[a-z0-9_]{0,12}$")
    # At most this many merchant pools stay open; least recently used ones are closed.
    db_max_pools: int = Field(32, ge=1)
    # Connections one merchant pool may hold.
    db_pool_max_size: int = Field(4, ge=1)
    # Ceiling on connections this process holds across every pool, control pool included.
    db_max_connections: int = Field(24, ge=2)
    db_command_timeout_seconds: float = Field(10.0, gt=0)
    # A pooled connection unused this long is closed (pools keep none open when idle).
    db_idle_connection_seconds: float = Field(60.0, gt=0)

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    events_exchange: str = "tally.events"
    # Relay safety net: how often every merchant database is swept for unpublished events.
    outbox_sweep_interval_seconds: float = Field(30.0, gt=0)
    consumer_prefetch: int = Field(32, ge=1)
    consumer_delivery_limit: int = Field(5, ge=1)

    # Housekeeping (tally_kit.housekeeping) deletes, every interval and in batches, outbox rows
    # published longer ago than their retention, inbox rows (the ids of handled events) and
    # idempotency keys older than theirs. An event older than the inbox's retention can no
    # longer be told from a redelivery: the consumer parks it rather than apply it twice. A
    # request repeated with its request_id after the keys' retention is a new request.
    housekeeping_interval_seconds: float = Field(3600.0, gt=0)
    housekeeping_batch_size: int = Field(5000, ge=1)
    outbox_retention_days: float = Field(7.0, gt=0)
    inbox_retention_days: float = Field(30.0, ge=1)
    idempotency_retention_days: float = Field(30.0, ge=1)

    jwt_algorithms: list[str] = ["HS256"]
    jwt_secret: SecretStr = SecretStr("tally-development-secret-change-me-0123456789")
    jwt_jwks_file: str | None = None
    jwt_jwks_url: str | None = None
    jwt_audience: str = "tally"
    jwt_issuer: str = "tally-dev"
    jwt_leeway_seconds: int = Field(30, ge=0)
    # This service's own bearer token (role `service`) for calls it makes outside any incoming
    # call (consumers, jobs). Empty: one is minted with `jwt_secret` (development only).
    service_token: SecretStr = SecretStr("")
