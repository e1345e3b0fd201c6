"""`python -m <service> migrate`, the command the Helm pre-install/pre-upgrade hook runs, for
every service that keeps merchant databases: run as a process against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from tally_catalog.app import build_directory as catalog_directory
from tally_catalog.settings import CatalogSettings
from tally_kit.db.directory import MerchantDirectory, merchant_database_name
from tally_kit.settings import ServiceSettings
from tally_kit.testing import drop_databases, unique_prefix
from tally_ledger.app import build_directory as ledger_directory
from tally_ledger.settings import LedgerSettings
from tally_payment_gateway.app import build_directory as payment_gateway_directory
from tally_payment_gateway.settings import PaymentGatewaySettings
from tally_receipt.app import build_directory as receipt_directory
from tally_receipt.settings import ReceiptSettings

pytestmark = pytest.mark.integration

SERVICES: dict[str, tuple[type[ServiceSettings], Callable[..., MerchantDirectory]]] = {
    "tally_catalog": (CatalogSettings, catalog_directory),
    "tally_ledger": (LedgerSettings, ledger_directory),
    "tally_receipt": (ReceiptSettings, receipt_directory),
    "tally_payment_gateway": (PaymentGatewaySettings, payment_gateway_directory),
}
MIGRATE_TIMEOUT_SECONDS = 60.0


@pytest.fixture(params=sorted(SERVICES))
async def provisioned(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, ServiceSettings, str]]:
    """(module, its settings on a prefix of this test, a merchant provisioned in it)."""
    module = request.param
    settings_class, build_directory = SERVICES[module]
    settings = settings_class(db_prefix=unique_prefix(), db_pool_max_size=2, db_max_connections=4)
    merchant_id = f"acme-{secrets.token_hex(3)}"
    directory = build_directory(settings)
    await directory.start()
    try:
        await directory.provision(merchant_id)
    finally:
        await directory.close()
    try:
        yield module, settings, merchant_id
    finally:
        await drop_databases(settings, settings.db_prefix)


async def migrate(module: str, settings: ServiceSettings) -> tuple[int, list[dict[str, object]]]:
    """Runs the command; its exit status and its JSON log lines."""
    env_prefix = type(settings).model_config.get("env_prefix", "")
    env = {**os.environ, f"{env_prefix}DB_PREFIX": settings.db_prefix}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        "migrate",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), MIGRATE_TIMEOUT_SECONDS)
    lines = [json.loads(line) for line in (stdout + stderr).decode().splitlines() if line.startswith("{")]
    assert process.returncode is not None
    return process.returncode, lines


async def test_migrate_walks_every_merchant_database_and_changes_nothing_when_up_to_date(
    provisioned: tuple[str, ServiceSettings, str],
) -> None:
    module, settings, _ = provisioned
    status, lines = await migrate(module, settings)
    assert status == 0, lines
    assert "migrated 1 merchant databases, 0 changed" in [line["message"] for line in lines]


async def test_migrate_stops_with_status_1_when_a_database_disagrees_with_its_migrations(
    provisioned: tuple[str, ServiceSettings, str],
) -> None:
    module, settings, merchant_id = provisioned
    connection = await asyncpg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        database=merchant_database_name(settings, merchant_id),
    )
    try:
        # An applied migration whose file has since been edited.
        await connection.execute(
            "UPDATE schema_migrations SET checksum = 'edited'"
            " WHERE version = (SELECT min(version) FROM schema_migrations)"
        )
    finally:
        await connection.close()
    status, lines = await migrate(module, settings)
    assert status == 1
    [failure] = [line for line in lines if line["message"] == "migration failed"]
    assert failure["level"] == "ERROR" and "MigrationError" in json.dumps(failure)
