"""Gateway settings: every `ServiceSettings` field (JWT verification among them), read from
`GATEWAY_*` variables, plus the HTTP edge's own: where it listens, where each gRPC service is,
deadlines, limits and CORS.

`GATEWAY_UPSTREAMS` is a JSON object from fully qualified gRPC service name to `host:port`;
the entries given replace the defaults of the same services and keep the others, e.g.
`GATEWAY_UPSTREAMS='{"tally.ledger.v1.LedgerService": "ledger:50052"}'`.
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict
from tally_kit.auth import ROLE_BY_CLAIM
from tally_kit.settings import ServiceSettings

DEFAULT_UPSTREAMS: dict[str, str] = {
    "tally.catalog.v1.CatalogService": "127.0.0.1:50051",
    "tally.ledger.v1.LedgerService": "127.0.0.1:50052",
    "tally.payment_gateway.v1.PaymentGatewayService": "127.0.0.1:50053",
    "tally.subscription_scheduler.v1.SubscriptionSchedulerService": "127.0.0.1:50054",
    "tally.loyalty.v1.LoyaltyService": "127.0.0.1:50055",
    "tally.receipt.v1.ReceiptService": "127.0.0.1:50056",
}

# The roles of external callers. `service` tokens belong to Tally's own services, which call
# each other over gRPC: one that leaks is still refused at the edge.
EDGE_ROLES = ("app", "admin", "platform")


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", frozen=True)

    service_name: str = "gateway"

    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)
    # Client addresses whose X-Forwarded-For / X-Forwarded-Proto are believed (the load
    # balancer's), as uvicorn's `forwarded_allow_ips`: the per-address rate limit needs the
    # real client address.
    forwarded_allow_ips: str = "127.0.0.1"

    # Fully qualified gRPC service name → `host:port`; see the module docstring.
    upstreams: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_UPSTREAMS))
    # Deadline of each upstream call, retries included.
    upstream_timeout_seconds: float = Field(5.0, gt=0)
    # Deadline of each upstream health check made by `/readyz`.
    readiness_timeout_seconds: float = Field(1.0, gt=0)
    # Services whose health decides `/readyz`; empty means every service the gateway routes to.
    readiness_services: list[str] = []

    # Roles whose tokens the edge accepts (a subset of app, admin, platform, service).
    edge_roles: list[str] = list(EDGE_ROLES)

    # Largest request body accepted (413 beyond it).
    max_request_bytes: int = Field(1024 * 1024, ge=1)

    # Token buckets: a sustained rate per second and a burst, per bearer token and per client
    # address (429 with Retry-After beyond them). Per gateway replica.
    rate_limit_token_per_second: float = Field(50.0, gt=0)
    rate_limit_token_burst: int = Field(100, ge=1)
    rate_limit_address_per_second: float = Field(100.0, gt=0)
    rate_limit_address_burst: int = Field(200, ge=1)
    # Buckets remembered at once per limiter; the least recently used are forgotten first
    # (a forgotten bucket comes back full, so only a caller idle that long gains from it).
    rate_limit_max_keys: int = Field(100_000, ge=1)

    # Origins allowed to call from a browser; CORS is off while the list is empty.
    cors_allowed_origins: list[str] = []
    cors_max_age_seconds: int = Field(600, ge=0)

    @field_validator("upstreams", mode="after")
    @classmethod
    def _over_defaults(cls, value: dict[str, str]) -> dict[str, str]:
        return {**DEFAULT_UPSTREAMS, **value}

    @field_validator("edge_roles", mode="after")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        unknown = set(value) - set(ROLE_BY_CLAIM)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}")
        return value
