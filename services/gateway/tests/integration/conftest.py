"""The gateway's upstreams for the whole session: the real catalog and ledger apps and a kit
server (KitTestService and a recording payment gateway), all in this process on port 0.

The run's databases carry one unique prefix and are dropped at the end; the exchanges the
catalog's and the ledger's relays declared are deleted.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tally.kittest.v1 import kittest_pb2_grpc
from tally.payment_gateway.v1 import payment_gateway_service_pb2_grpc as payments_grpc
from tally_catalog.app import build_app as build_catalog_app
from tally_kit.server import ServiceApp, ServiceRegistration
from tally_kit.settings import ServiceSettings
from tally_kit.testing import drop_databases, unique_prefix
from tally_ledger.app import build_app as build_ledger_app

# Test folders are not packages and pytest imports with --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_e2e import (
    KIT,
    PAYMENTS,
    KitServicer,
    RecordingPayments,
    Upstreams,
    catalog_settings,
    delete_event_exchanges,
    ledger_settings,
)


@pytest.fixture(scope="session")
async def upstreams() -> AsyncIterator[Upstreams]:
    prefix = unique_prefix()
    catalog_config = catalog_settings(prefix)
    catalog_app = build_catalog_app(catalog_config)
    ledger_app: ServiceApp | None = None
    ledger_exchange = ""
    payments = RecordingPayments()
    kit_app = ServiceApp(
        ServiceSettings(service_name="kittest", grpc_host="127.0.0.1", grpc_port=0, metrics_port=0),
        services=[
            ServiceRegistration(KIT, kittest_pb2_grpc.add_KitTestServiceServicer_to_server, KitServicer()),
            ServiceRegistration(
                PAYMENTS, payments_grpc.add_PaymentGatewayServiceServicer_to_server, payments
            ),
        ],
    )
    try:
        catalog_port = await catalog_app.start()
        ledger_config = ledger_settings(prefix, f"127.0.0.1:{catalog_port}")
        ledger_exchange = ledger_config.events_exchange
        ledger_app = build_ledger_app(ledger_config)
        ledger_port = await ledger_app.start()
        kit_port = await kit_app.start()
        yield Upstreams(
            catalog=catalog_config,
            catalog_target=f"127.0.0.1:{catalog_port}",
            ledger_target=f"127.0.0.1:{ledger_port}",
            kit_target=f"127.0.0.1:{kit_port}",
            payments=payments,
        )
    finally:
        await kit_app.stop()
        if ledger_app is not None:
            await ledger_app.stop()
        await catalog_app.stop()
        await delete_event_exchanges(
            catalog_config, [catalog_config.events_exchange, *([ledger_exchange] if ledger_exchange else [])]
        )
        await drop_databases(catalog_config, prefix)
