"""Fixtures of the servicer tests: the real merchant directory, unit of work, idempotency and
outbox on the real PostgreSQL; an in-memory catalog; a clock the tests move.

One directory and servicer serve the session; each test module works on a merchant of its
own and each test on users of its own. After every test, every account's kept balance and
debt, and every lot's kept remaining credits, must equal the sums of their entries. The
run's databases carry a unique prefix and are dropped at the end.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tally_kit.db.directory import MerchantDirectory
from tally_kit.testing import drop_databases, unique_prefix
from tally_kit.uow import Mutations
from tally_ledger.servicer import LedgerServicer
from tally_ledger.services import Ledger
from tally_ledger.settings import LedgerSettings
from tally_ledger.store import MIGRATIONS

# The helpers shared by these test modules live beside this file; test folders are not
# packages and pytest runs with --import-mode=importlib, which puts no test folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ledger_harness import PRODUCER, T0, Client, Clock, MemoryCatalog, RecordingRelay, books_disagreements


@pytest.fixture(scope="session")
async def ledger_settings() -> AsyncIterator[LedgerSettings]:
    # The PostgreSQL server is shared with other test runs: small pools.
    settings = LedgerSettings(
        db_prefix=unique_prefix(), db_max_pools=4, db_pool_max_size=4, db_max_connections=10
    )
    yield settings
    await drop_databases(settings, settings.db_prefix)


@pytest.fixture(scope="session")
async def directory(ledger_settings: LedgerSettings) -> AsyncIterator[MerchantDirectory]:
    directory = MerchantDirectory(ledger_settings, [MIGRATIONS])
    await directory.start()
    yield directory
    await directory.close()


@pytest.fixture(scope="session")
def catalog() -> MemoryCatalog:
    return MemoryCatalog()


@pytest.fixture(scope="session")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def relay() -> RecordingRelay:
    return RecordingRelay()


@pytest.fixture(scope="session")
def mutations(directory: MerchantDirectory, relay: RecordingRelay) -> Mutations:
    return Mutations(directory, relay, producer=PRODUCER)


@pytest.fixture(scope="session")
def servicer(
    directory: MerchantDirectory, mutations: Mutations, catalog: MemoryCatalog, clock: Clock
) -> LedgerServicer:
    return LedgerServicer(directory, mutations, catalog, clock=clock)


@pytest.fixture(scope="session")
def ledger(catalog: MemoryCatalog, clock: Clock) -> Ledger:
    """The service layer the event handlers and jobs call."""
    return Ledger(catalog, clock=clock)


@pytest.fixture(scope="module")
def merchant_id(catalog: MemoryCatalog, request: pytest.FixtureRequest) -> str:
    """A merchant the catalog knows, of this module; its ledger database is created on first use."""
    label = request.module.__name__.rpartition(".")[2].removeprefix("test_").replace("_", "-")[:20]
    merchant_id = f"{label}-{secrets.token_hex(3)}"
    catalog.add_merchant(merchant_id)
    catalog.schedule_rate(merchant_id, "llm.tokens", "0.002", T0)
    return merchant_id


@pytest.fixture
def client(servicer: LedgerServicer, merchant_id: str, clock: Clock) -> Client:
    return Client(servicer, merchant_id, clock)


@pytest.fixture(autouse=True)
async def books_stay_balanced(directory: MerchantDirectory, catalog: MemoryCatalog) -> AsyncIterator[None]:
    yield
    for merchant_id in list(catalog.terms):
        if await directory.is_provisioned(merchant_id):
            assert await books_disagreements(directory, merchant_id) == []
