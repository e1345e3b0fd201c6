"""Shared fixtures of the kit's tests, which run against the real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tally_kit.settings import ServiceSettings
from tally_kit.testing import drop_databases, unique_prefix


@pytest.fixture(scope="session")
async def kit_settings() -> AsyncIterator[ServiceSettings]:
    """Settings whose db_prefix is unique to this run; its databases are dropped at the end.

    Small pools and ceiling: the server is shared. Derive variants with
    `kit_settings.model_copy(update={...})`.
    """
    settings = ServiceSettings(
        service_name="kit",
        db_prefix=unique_prefix(),
        db_max_pools=8,
        db_pool_max_size=2,
        db_max_connections=6,
        db_command_timeout_seconds=10.0,
    )
    yield settings
    await drop_databases(settings, settings.db_prefix)
