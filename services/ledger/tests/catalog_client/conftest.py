"""Fixtures of the catalog-client tests: one real catalog for the module's reads, and readers
over kit channels to it."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from tally_kit.auth import ServiceToken
from tally_kit.settings import ServiceSettings
from tally_ledger.catalog_client import CachePolicy, GrpcCatalogReader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from catalog_harness import RunningCatalog

OpenReader = Callable[..., Awaitable[GrpcCatalogReader]]


@pytest.fixture(scope="session")
async def catalog() -> AsyncIterator[RunningCatalog]:
    running = RunningCatalog()
    try:
        await running.start()
        yield running
    finally:
        await running.close()


@pytest.fixture
async def open_reader(catalog: RunningCatalog) -> AsyncIterator[OpenReader]:
    """Opens readers of `catalog` (or of another running catalog), closed after the test."""
    readers: list[GrpcCatalogReader] = []

    async def open_(
        running: RunningCatalog | None = None, *, cache: CachePolicy | None = None, **options: object
    ) -> GrpcCatalogReader:
        target = running or catalog
        # The catalog verifies tokens with its own settings; the ledger's development token
        # is minted with the same default secret, audience and issuer.
        token = ServiceToken(ServiceSettings(), subject="ledger")
        reader = GrpcCatalogReader.open(
            target.target,
            service_token=token,
            cache=cache or CachePolicy(),
            **options,  # type: ignore[arg-type]
        )
        readers.append(reader)
        return reader

    yield open_
    for reader in readers:
        await reader.close()
