"""The whole stack end to end: the real catalog, ledger, receipt and payment gateway apps in this
process, on port 0, in one event loop, and the PSP simulator as a process of its own.

Every service has a database prefix of its own and publishes to one events exchange of the
run; each consumer's queues carry a name of the run. The ledger and the receipt service read
the test catalog over gRPC; the payment gateway calls the simulator over HTTP. At the end the
apps stop, the simulator process ends, and every database, queue and exchange of the run is
removed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aio_pika
import pytest
from tally_catalog.app import build_app as build_catalog
from tally_kit.events.topology import (
    dead_letter_exchange_name,
    events_queue_name,
    parking_queue_name,
    unrouted_exchange_name,
    unrouted_queue_name,
)
from tally_kit.server import ServiceApp
from tally_kit.settings import ServiceSettings
from tally_kit.testing import drop_databases, unique_prefix
from tally_ledger.app import build_app as build_ledger
from tally_payment_gateway.app import build_app as build_payment_gateway
from tally_payment_gateway.handlers import consumer_name as payment_gateway_consumer_name
from tally_receipt.app import build_app as build_receipt

# The helpers shared by these test modules live beside this file; test folders are not
# packages and pytest runs with --import-mode=importlib, which puts no test folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_suite import (
    STUBS,
    Stack,
    catalog_settings,
    connect,
    ledger_settings,
    payment_gateway_settings,
    receipt_settings,
    running_simulator,
)


@pytest.fixture(scope="session")
async def stack() -> AsyncIterator[Stack]:
    prefixes = {service: unique_prefix() for service in STUBS}
    exchange = f"{prefixes['catalog']}tally.e2e"
    catalog_config = catalog_settings(prefixes["catalog"], exchange)
    consumers: list[str] = []
    async with AsyncExitStack() as cleanup:
        # Registered first, run last: whatever started, its databases and broker topology go.
        cleanup.push_async_callback(_drop_databases, catalog_config, list(prefixes.values()))
        cleanup.push_async_callback(_delete_topology, catalog_config, exchange, consumers)

        catalog = build_catalog(catalog_config)
        cleanup.push_async_callback(catalog.stop)
        catalog_port = await catalog.start()
        catalog_target = f"127.0.0.1:{catalog_port}"
        simulator = await cleanup.enter_async_context(running_simulator())

        ledger_config = ledger_settings(prefixes["ledger"], exchange, catalog_target)
        receipt_config = receipt_settings(prefixes["receipt"], exchange, catalog_target)
        payment_gateway_config = payment_gateway_settings(
            prefixes["payment_gateway"], exchange, simulator.url
        )
        consumers += [
            ledger_config.consumer_name,
            receipt_config.consumer_name,
            payment_gateway_consumer_name(payment_gateway_config),
        ]
        settings: dict[str, ServiceSettings] = {
            "catalog": catalog_config,
            "ledger": ledger_config,
            "receipt": receipt_config,
            "payment_gateway": payment_gateway_config,
        }
        apps: dict[str, ServiceApp] = {
            "ledger": build_ledger(ledger_config),
            "receipt": build_receipt(receipt_config),
            "payment_gateway": build_payment_gateway(payment_gateway_config),
        }
        for app in apps.values():
            cleanup.push_async_callback(app.stop)
        # They start at once; one failing cancels the others' start.
        async with asyncio.TaskGroup() as starting:
            starts = {name: starting.create_task(app.start()) for name, app in apps.items()}
        ports = {"catalog": catalog_port} | {name: start.result() for name, start in starts.items()}

        running = Stack(
            simulator=simulator,
            **{name: connect(settings[name], ports[name], stub) for name, stub in STUBS.items()},
        )
        cleanup.push_async_callback(running.close)
        yield running


async def _drop_databases(settings: ServiceSettings, prefixes: list[str]) -> None:
    # Every service's databases are on the one PostgreSQL server of the run.
    for prefix in prefixes:
        await drop_databases(settings, prefix)


async def _delete_topology(settings: ServiceSettings, exchange: str, consumers: list[str]) -> None:
    """The consumers' queues and dead-letter exchanges, the events exchange and its unrouted
    exchange and queue."""
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        channel = await connection.channel()
        for consumer in consumers:
            await channel.queue_delete(events_queue_name(consumer))
            await channel.queue_delete(parking_queue_name(consumer))
            await channel.exchange_delete(dead_letter_exchange_name(consumer))
        await channel.exchange_delete(exchange)
        await channel.exchange_delete(unrouted_exchange_name(exchange))
        await channel.queue_delete(unrouted_queue_name(exchange))
