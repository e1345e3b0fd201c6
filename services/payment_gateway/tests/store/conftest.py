"""Fixtures of the store tests: the real merchant directory and migrations on the real
PostgreSQL, one merchant database for the session. The run's databases carry a unique prefix
and are dropped at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tally_kit.db import MerchantDirectory
from tally_kit.testing import drop_databases, unique_prefix
from tally_payment_gateway.app import build_directory
from tally_payment_gateway.settings import PaymentGatewaySettings

MERCHANT = "store-tests"


@pytest.fixture(scope="session")
async def directory() -> AsyncIterator[MerchantDirectory]:
    # The PostgreSQL server is shared with other test runs: small pools.
    settings = PaymentGatewaySettings(
        db_prefix=unique_prefix(), db_max_pools=2, db_pool_max_size=3, db_max_connections=5
    )
    directory = build_directory(settings)
    try:
        await directory.start()
        await directory.provision(MERCHANT)
        yield directory
    finally:
        await directory.close()
        await drop_databases(settings, settings.db_prefix)
