"""Ledger settings: every `ServiceSettings` field, read from `LEDGER_*` variables, and how the
ledger reaches the catalog."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from tally_kit.settings import ServiceSettings


class LedgerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LEDGER_", extra="ignore", frozen=True)

    service_name: str = "ledger"
    grpc_port: int = 50052
    metrics_port: int = 9102

    # The catalog's gRPC address (products, operation types, merchant terms).
    catalog_target: str = "127.0.0.1:50051"
    # Deadline of each call to the catalog.
    catalog_timeout_seconds: float = Field(2.0, gt=0)
    # Catalog answers kept in memory (one bounded LRU).
    catalog_cache_size: int = Field(10000, ge=1)
    # Merchant terms and sign-up grant lists are read again after this long, and an active
    # product is checked again for archiving.
    catalog_cache_ttl_seconds: float = Field(60.0, ge=0)
    # How long the latest operation-type version read is taken as still the latest.
    catalog_rate_staleness_seconds: float = Field(5.0, ge=0)

    # Names the payment-event consumer's queues: `<name>.events`, `<name>.parking`, `<name>.dlx`.
    consumer_name: str = Field("ledger", pattern=r"^[a-z0-9_.-]{1,64}$")
    # How often every merchant database is walked for lots past their expiry and for
    # operations left open past the merchant's timeout.
    lot_expiry_interval_seconds: float = Field(60.0, gt=0)
    operation_timeout_interval_seconds: float = Field(30.0, gt=0)
    # Items one job claims per transaction.
    job_batch_size: int = Field(100, ge=1)
