"""Catalog settings: every `ServiceSettings` field, read from `CATALOG_*` variables."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict
from tally_kit.settings import ServiceSettings


class CatalogSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CATALOG_", extra="ignore", frozen=True)

    service_name: str = "catalog"
    grpc_port: int = 50051
    metrics_port: int = 9101
