"""What documents need from the catalog: a merchant's legal details, series prefix and tax regime.

Read with `GetMerchant` over a channel from `tally_kit.clients` (deadline, retries on
UNAVAILABLE, circuit breaker) with the receipt service's own token, since event handlers
have no caller whose token could be forwarded. Each merchant's profile is cached for
`merchant_config_ttl_seconds`, so a burst of events costs one call, and a configuration
change reaches new documents within that time.

Failures, as the event consumer sees them:
- the catalog does not know the merchant: NotFound (MERCHANT_NOT_FOUND), which parks the
  event (an operator replays it once the merchant exists);
- the catalog cannot answer (down, circuit open, deadline, internal error, credentials
  refused): Unavailable (CATALOG_UNAVAILABLE), a transient error: the event is retried
  later, never dropped;
- the catalog answers with a configuration the receipt service cannot read: UpstreamError
  (CATALOG_CONTRACT_BROKEN), which parks the event.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import grpc
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.catalog.v1 import catalog_service_pb2_grpc
from tally.catalog.v1 import resources_pb2 as catalog
from tally_kit.amounts import parse_decimal
from tally_kit.auth import ServiceToken
from tally_kit.cache import ExpiringCache
from tally_kit.clients import open_channel
from tally_kit.db import is_valid_merchant_id
from tally_kit.errors import NotFound, RuleViolation, Unavailable
from tally_kit.status import UpstreamError

from tally_receipt.domain import MerchantProfile, MerchantSnapshot, PostalAddress, TaxRegime
from tally_receipt.settings import ReceiptSettings

log = logging.getLogger(__name__)

CATALOG_UNAVAILABLE = "CATALOG_UNAVAILABLE"
# The catalog's own limit on tax rates.
TAX_RATE_FRACTION_DIGITS = 4
MAX_TAX_RATE_PERCENT = 100
MAX_CACHED_MERCHANTS = 1024


class MerchantProfiles(Protocol):
    async def profile(self, merchant_id: str) -> MerchantProfile:
        """NotFound (MERCHANT_NOT_FOUND); Unavailable (CATALOG_UNAVAILABLE)."""
        ...

    async def close(self) -> None: ...


class CatalogMerchantProfiles:
    """`MerchantProfiles` read from the catalog's gRPC API, each cached for `ttl_seconds`."""

    def __init__(self, channel: grpc.aio.Channel, *, ttl_seconds: float) -> None:
        self._channel = channel
        self._stub = catalog_service_pb2_grpc.CatalogServiceStub(channel)
        self._ttl_seconds = ttl_seconds
        self._cache: ExpiringCache[str, MerchantProfile] = ExpiringCache(
            MAX_CACHED_MERCHANTS, clock=time.monotonic
        )

    @classmethod
    def open(cls, settings: ReceiptSettings) -> CatalogMerchantProfiles:
        channel = open_channel(
            settings.catalog_target,
            name="catalog",
            timeout_seconds=settings.catalog_timeout_seconds,
            safe_methods=("GetMerchant",),
            service_token=ServiceToken(settings),
        )
        return cls(channel, ttl_seconds=settings.merchant_config_ttl_seconds)

    async def close(self) -> None:
        await self._channel.close()

    async def profile(self, merchant_id: str) -> MerchantProfile:
        if not is_valid_merchant_id(merchant_id):
            # The catalog would refuse it as bad input: no merchant has such an id.
            raise NotFound(f"merchant {merchant_id!r} does not exist", reason="MERCHANT_NOT_FOUND")
        cached = self._cache.get(merchant_id)
        if cached is not None:
            return cached
        try:
            response = await self._stub.GetMerchant(api.GetMerchantRequest(merchant_id=merchant_id))
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"the catalog does not know merchant {merchant_id}", reason="MERCHANT_NOT_FOUND"
                ) from None
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                log.error("the catalog refuses the receipt service's credentials: %s", error.details())
            raise Unavailable(
                f"the catalog cannot answer: {error.code().name}", reason=CATALOG_UNAVAILABLE
            ) from None
        except Unavailable as open_circuit:
            raise Unavailable(
                f"the catalog cannot answer: {open_circuit.reason}", reason=CATALOG_UNAVAILABLE
            ) from None
        profile = merchant_profile(response.merchant)
        self._cache.put(merchant_id, profile, time.monotonic() + self._ttl_seconds)
        return profile


def merchant_profile(merchant: catalog.Merchant) -> MerchantProfile:
    config = merchant.config
    text = config.tax_regime.rate_percent
    try:
        rate_percent = parse_decimal(text, TAX_RATE_FRACTION_DIGITS)
        if not 0 <= rate_percent <= MAX_TAX_RATE_PERCENT:
            raise RuleViolation("must be between 0 and 100")
    except RuleViolation as malformed:
        # The catalog validates what it stores: a rate it sends unreadable means the two
        # builds disagree on the API, which no retry fixes.
        log.error(
            "the catalog sent merchant %s the tax rate %r, which %s", merchant.merchant_id, text, malformed
        )
        raise UpstreamError(
            "the catalog sent a tax rate the receipt service cannot read",
            code=grpc.StatusCode.INTERNAL,
            reason="CATALOG_CONTRACT_BROKEN",
        ) from None
    address = config.address
    return MerchantProfile(
        merchant=MerchantSnapshot(
            legal_name=config.legal_name,
            tax_id=config.tax_id,
            address=PostalAddress(
                address_lines=tuple(address.address_lines),
                locality=address.locality,
                administrative_area=address.administrative_area,
                postal_code=address.postal_code,
                region_code=address.region_code,
            ),
            config_revision=merchant.config_revision,
        ),
        series_prefix=config.receipt_series_prefix,
        tax_regime=TaxRegime(
            rate_percent=rate_percent, prices_include_tax=config.tax_regime.prices_include_tax
        ),
    )
