"""Settings every test process shares, applied before any service settings are read.

The suite starts many services in one process (each test folder's session fixtures live
until the run ends) against one PostgreSQL whose default ceiling is 100 connections. A
pooled connection idle for a second is closed, so a folder whose tests have finished
holds none while later folders run.
"""

from __future__ import annotations

import os

import pytest

SERVICE_ENV_PREFIXES = ("TALLY_", "CATALOG_", "LEDGER_", "RECEIPT_", "PAYMENT_GATEWAY_", "GATEWAY_")


def pytest_configure(config: pytest.Config) -> None:
    for prefix in SERVICE_ENV_PREFIXES:
        os.environ.setdefault(f"{prefix}DB_IDLE_CONNECTION_SECONDS", "1")
