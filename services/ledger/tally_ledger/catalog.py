"""What the ledger reads from the catalog, and the port it reads it through.

The ledger never reads the catalog's tables: it calls the catalog's gRPC API. Products
and effective operation-type versions are immutable, so they are cached; the cache lets
the ledger keep serving while the catalog is briefly down (circuit breaker open), and a
read that neither the cache nor the catalog can answer fails with UNAVAILABLE, reason
CATALOG_UNAVAILABLE.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Protocol
from uuid import UUID

from tally_ledger.domain import OperationRate


class Distribution(enum.Enum):
    SELLABLE = "sellable"
    GRANT = "grant"


class GrantPolicy(enum.Enum):
    APPLY_ON_SIGNUP = "apply_on_signup"
    MANUAL_GRANT = "manual_grant"


@dataclass(frozen=True)
class ProductTemplate:
    """A catalog product as the ledger issues lots from it."""

    product_id: UUID
    name: str
    credits: Decimal
    # Lots expire this many days after issue; None means never.
    access_period_days: int | None
    distribution: Distribution
    grant_policy: GrantPolicy | None
    archived: bool


@dataclass(frozen=True)
class MerchantTerms:
    """The merchant configuration the ledger applies."""

    operation_timeout: timedelta


class CatalogReader(Protocol):
    async def product(self, merchant_id: str, product_id: UUID) -> ProductTemplate:
        """NotFound (PRODUCT_NOT_FOUND, MERCHANT_NOT_FOUND); Unavailable (CATALOG_UNAVAILABLE)."""
        ...

    async def signup_products(self, merchant_id: str) -> list[ProductTemplate]:
        """Every active GRANT product with the APPLY_ON_SIGNUP policy."""
        ...

    async def operation_rate(self, merchant_id: str, operation_code: str, at: datetime) -> OperationRate:
        """The version active at `at`: NotFound (OPERATION_TYPE_NOT_FOUND) for an unknown code,
        FailedPrecondition (OPERATION_TYPE_NOT_ACTIVE) before its first version starts."""
        ...

    async def merchant_terms(self, merchant_id: str) -> MerchantTerms:
        """NotFound (MERCHANT_NOT_FOUND) when the catalog does not know the merchant."""
        ...
