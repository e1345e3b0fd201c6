"""Fixtures of the store tests, which run against the real PostgreSQL.

The receipt service's own `MerchantDirectory` creates and migrates one merchant database
(the kit's migrations, then the receipt's) for the whole run; each test works on series
prefixes, users and orders of its own, so tests never see each other's documents. Every
database carries a prefix unique to the run and is dropped at the end.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from tally_kit.db import MerchantDirectory
from tally_kit.testing import drop_databases, unique_prefix
from tally_receipt.app import build_directory
from tally_receipt.domain import MerchantProfile, MerchantSnapshot, PostalAddress, TaxRegime
from tally_receipt.settings import ReceiptSettings


@pytest.fixture(scope="session")
async def store_settings() -> AsyncIterator[ReceiptSettings]:
    settings = ReceiptSettings(
        db_prefix=unique_prefix(),
        # The server is shared: enough connections for real contention on one series, no more.
        db_max_pools=2,
        db_pool_max_size=8,
        db_max_connections=10,
    )
    yield settings
    await drop_databases(settings, settings.db_prefix)


@pytest.fixture(scope="session")
async def directory(store_settings: ReceiptSettings) -> AsyncIterator[MerchantDirectory]:
    directory = build_directory(store_settings)
    await directory.start()
    try:
        yield directory
    finally:
        await directory.close()


@pytest.fixture(scope="session")
async def merchant_id(directory: MerchantDirectory) -> str:
    merchant_id = f"shop-{secrets.token_hex(3)}"
    await directory.provision(merchant_id)
    return merchant_id


@pytest.fixture
def series() -> str:
    """A series prefix of the test alone."""
    return f"T{secrets.token_hex(4).upper()}"


@pytest.fixture
def profile(series: str) -> MerchantProfile:
    return MerchantProfile(
        merchant=MerchantSnapshot(
            legal_name="Acme SAS",
            tax_id="FR40303265045",
            address=PostalAddress(("1 rue de la Paix",), "Paris", "", "75002", "FR"),
            config_revision=1,
        ),
        series_prefix=series,
        tax_regime=TaxRegime(rate_percent=Decimal("20"), prices_include_tax=True),
    )
