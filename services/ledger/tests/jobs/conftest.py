"""Fixtures of the job tests: a real catalog, the ledger's merchant directory on the real
PostgreSQL, a catalog reader over gRPC, and per test a merchant of its own and a ledger whose
clock the test moves. Databases carry a unique prefix and are dropped at the end."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tally_kit.auth import ServiceToken
from tally_kit.db import MerchantDirectory
from tally_kit.testing import drop_databases
from tally_ledger.catalog_client import GrpcCatalogReader
from tally_ledger.services import Ledger, MerchantGate
from tally_ledger.settings import LedgerSettings
from tally_ledger.store import MIGRATIONS

# Helpers beside this file and the catalog harness: test folders are not packages and pytest
# runs with --import-mode=importlib, which puts no test folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "catalog_client"))

from catalog_harness import RunningCatalog, new_merchant_id
from ledger_support import MovingClock, ledger_settings


@pytest.fixture(scope="session")
async def jobs_catalog() -> AsyncIterator[RunningCatalog]:
    running = RunningCatalog()
    try:
        await running.start()
        yield running
    finally:
        await running.close()


@pytest.fixture(scope="session")
async def jobs_settings(jobs_catalog: RunningCatalog) -> AsyncIterator[LedgerSettings]:
    settings = ledger_settings(jobs_catalog.target)
    yield settings
    await drop_databases(settings, settings.db_prefix)


@pytest.fixture(scope="session")
async def jobs_directory(jobs_settings: LedgerSettings) -> AsyncIterator[MerchantDirectory]:
    directory = MerchantDirectory(jobs_settings, [MIGRATIONS])
    await directory.start()
    yield directory
    await directory.close()


@pytest.fixture(scope="session")
async def jobs_reader(jobs_settings: LedgerSettings) -> AsyncIterator[GrpcCatalogReader]:
    reader = GrpcCatalogReader.open(
        jobs_settings.catalog_target, service_token=ServiceToken(jobs_settings, subject="ledger")
    )
    yield reader
    await reader.close()


@pytest.fixture
def clock() -> MovingClock:
    return MovingClock()


@pytest.fixture
def ledger(jobs_reader: GrpcCatalogReader, clock: MovingClock) -> Ledger:
    return Ledger(jobs_reader, clock=clock)


@pytest.fixture
async def merchant_id(
    jobs_catalog: RunningCatalog, jobs_directory: MerchantDirectory, jobs_reader: GrpcCatalogReader
) -> str:
    """A merchant of this test: in the catalog (15-minute operation timeout, `api.calls` at one
    credit per call) and in the ledger."""
    merchant_id = new_merchant_id("jobs")
    await jobs_catalog.create_merchant(merchant_id)
    await jobs_catalog.schedule_operation_type(merchant_id, "api.calls", "1", resource_unit="call")
    await MerchantGate(jobs_directory, jobs_reader).ensure(merchant_id)
    return merchant_id
