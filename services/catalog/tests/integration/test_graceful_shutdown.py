"""Graceful shutdown of the real process: `python -m tally_catalog` stopped with SIGTERM right
after its last change exits 0, and every event committed before it is published."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tally.catalog.v1 import catalog_service_pb2 as api
from tally_catalog.testing import (
    SERVICE_NAME,
    Catalog,
    Databases,
    EventCapture,
    catalog_settings,
    eventually,
    new_id,
    new_merchant_id,
    sellable_product,
)
from tally_kit.failpoints import ENVIRONMENT_VARIABLE as FAILPOINTS_VARIABLE
from tally_kit.testing import drop_databases

pytestmark = pytest.mark.integration

START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def process_catalog(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, Catalog, Path]]:
    """The catalog as its own process, with the environment a deployment gives it."""
    settings = catalog_settings(grpc_port=free_port(), metrics_port=free_port())
    environment = {
        **os.environ,
        "CATALOG_GRPC_HOST": "127.0.0.1",
        "CATALOG_GRPC_PORT": str(settings.grpc_port),
        "CATALOG_METRICS_PORT": str(settings.metrics_port),
        "CATALOG_DB_PREFIX": settings.db_prefix,
        "CATALOG_EVENTS_EXCHANGE": settings.events_exchange,
        "CATALOG_DB_POOL_MAX_SIZE": "2",
        "CATALOG_DB_MAX_CONNECTIONS": "6",
    }
    environment.pop(FAILPOINTS_VARIABLE, None)
    events = EventCapture(settings.amqp_url.get_secret_value(), settings.events_exchange)
    log = tmp_path / "catalog.log"
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
    process: asyncio.subprocess.Process | None = None
    try:
        await events.start()
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tally_catalog", env=environment, stdout=output, stderr=output
            )
        yield process, Catalog(settings, channel, Databases(settings), events), log
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        await channel.close()
        await events.close()
        await drop_databases(settings, settings.db_prefix)


async def _wait_until_serving(process: asyncio.subprocess.Process, catalog: Catalog, log: Path) -> None:
    health = health_pb2_grpc.HealthStub(catalog.channel)

    async def serving() -> bool:
        if process.returncode is not None:
            output = await asyncio.to_thread(log.read_text)
            raise AssertionError(f"the catalog exited with {process.returncode}:\n{output}")
        try:
            response = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    await eventually(serving, within=START_TIMEOUT_SECONDS)


async def test_sigterm_exits_cleanly_after_publishing_every_committed_event(
    process_catalog: tuple[asyncio.subprocess.Process, Catalog, Path],
) -> None:
    process, catalog, log = process_catalog
    await _wait_until_serving(process, catalog, log)
    merchant_id = new_merchant_id("stop")
    await catalog.create_merchant(merchant_id)
    calls = [
        asyncio.ensure_future(
            catalog.call(
                "CreateProduct",
                api.CreateProductRequest(
                    merchant_id=merchant_id, request_id=new_id(), product=sellable_product(name=f"Pack {n}")
                ),
            )
        )
        for n in range(10)
    ]

    # While the other calls are in flight and the relay may still be publishing.
    await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
    process.send_signal(signal.SIGTERM)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    exit_code = await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
    assert exit_code == 0, await asyncio.to_thread(log.read_text)

    # Calls either finished or were turned away once the server stopped taking new ones.
    created = {outcome.product.product_id for outcome in outcomes if not isinstance(outcome, BaseException)}
    turned_away = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert created
    assert all(
        isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
        for error in turned_away
    ), turned_away
    # Every event committed before the exit is published: the outbox holds no pending row,
    # and the broker delivered each one, the products of every finished call among them.
    outbox = await catalog.databases.outbox(merchant_id)
    assert [row for row in outbox if not row.published] == []
    await eventually(lambda: {row.event_id for row in outbox} <= catalog.events.event_ids())
    announced = {
        event.payload.product.product_id  # type: ignore[attr-defined]
        for event in catalog.events.received
        if event.routing_key == "catalog.product_created"
    }
    assert created <= announced
    assert len(outbox) == 1 + len(announced)
