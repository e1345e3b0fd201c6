"""A payment gateway process killed around a call to the provider (`tally_kit.failpoints`: SIGKILL,
no cleanup at all) loses no charge and makes none twice: the intent it committed before the
call is found by the reconciliation job, which asks the provider what happened.

The app runs as `python -m tally_payment_gateway`, configured through its environment, against
the simulator process, PostgreSQL and RabbitMQ; the job then runs in the test's process over the
same databases.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tally.payment_gateway.v1 import payment_gateway_service_pb2_grpc
from tally_kit.auth import issue_dev_token
from tally_kit.testing import drop_databases, unique_prefix
from tally_payment_gateway import reconciliation, store
from tally_payment_gateway.app import build_directory
from tally_payment_gateway.authorize_net import AuthorizeNetProvider
from tally_payment_gateway.domain import PaymentState
from tally_payment_gateway.settings import PaymentGatewaySettings
from tally_payment_gateway.testing import (
    Gateway,
    LaterClock,
    Simulator,
    delete_broker_objects,
    gateway_settings,
    new_account,
    running_simulator,
)

MERCHANT = "crash-merchant"
READY_SECONDS = 20.0


class RecordingRelay:
    def __init__(self) -> None:
        self.notified: list[str] = []

    def notify(self, merchant_id: str) -> None:
        self.notified.append(merchant_id)


@pytest.fixture(scope="module")
async def simulator() -> AsyncIterator[Simulator]:
    async with running_simulator() as running:
        yield running


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(settings: PaymentGatewaySettings, failpoint: str) -> dict[str, str]:
    accounts = {
        merchant_id: {
            "api_login_id": account.api_login_id,
            "transaction_key": account.transaction_key.get_secret_value(),
            "signature_key": account.signature_key.get_secret_value(),
        }
        for merchant_id, account in settings.authorize_net_accounts.items()
    }
    values = {
        "GRPC_HOST": settings.grpc_host,
        "GRPC_PORT": str(settings.grpc_port),
        "METRICS_PORT": "0",
        "DB_PREFIX": settings.db_prefix,
        "DB_MAX_POOLS": str(settings.db_max_pools),
        "DB_POOL_MAX_SIZE": str(settings.db_pool_max_size),
        "DB_MAX_CONNECTIONS": str(settings.db_max_connections),
        "EVENTS_EXCHANGE": settings.events_exchange,
        "AUTHORIZE_NET_URL": settings.authorize_net_url,
        "AUTHORIZE_NET_ACCOUNTS": json.dumps(accounts),
        "PROVIDER_TIMEOUT_SECONDS": str(settings.provider_timeout_seconds),
        "LOG_LEVEL": "WARNING",
    }
    return {
        **os.environ,
        **{f"PAYMENT_GATEWAY_{name}": value for name, value in values.items()},
        "TALLY_FAILPOINTS": failpoint,
    }


async def _serving(port: int, process: asyncio.subprocess.Process) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(READY_SECONDS):
            while True:
                assert process.returncode is None, "the payment gateway exited while starting"
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("failpoint", "settled_state", "charges"),
    [
        ("payment_gateway.after_provider_answer", PaymentState.CAPTURED, 1),
        ("payment_gateway.before_provider_call", PaymentState.FAILED, 0),
    ],
    ids=["killed-after-the-charge", "killed-before-the-call"],
)
async def test_a_process_killed_around_its_call_loses_no_charge(
    simulator: Simulator, failpoint: str, settled_state: PaymentState, charges: int
) -> None:
    account = new_account()
    await simulator.add_account(account, None)
    settings = gateway_settings(unique_prefix(), simulator.url, {MERCHANT: account}).model_copy(
        update={"grpc_port": _free_port()}
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tally_payment_gateway",
        env=_environment(settings, failpoint),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    directory = build_directory(settings)
    provider = AuthorizeNetProvider.from_settings(settings)
    try:
        await _serving(settings.grpc_port, process)
        request = Gateway.purchase_request(MERCHANT)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            stub = payment_gateway_service_pb2_grpc.PaymentGatewayServiceStub(channel)
            token = issue_dev_token(settings, role="platform", merchant_id=None)
            with pytest.raises(grpc.aio.AioRpcError) as cut_off:
                await stub.Purchase(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        assert cut_off.value.code() is grpc.StatusCode.UNAVAILABLE
        assert await process.wait() == -9

        await directory.start()
        async with directory.connection(MERCHANT) as conn:
            [row] = await conn.fetch("SELECT payment_id FROM payments WHERE order_id = $1", request.order_id)
            payment = await store.get_payment(conn, MERCHANT, row["payment_id"])
        assert payment is not None and payment.state is PaymentState.PENDING and payment.pending is not None
        assert len(await simulator.transactions(payment.provider_order_reference)) == charges

        later = LaterClock()
        later.offset = reconciliation.settle_after(settings) + timedelta(seconds=1)
        relay = RecordingRelay()
        job = reconciliation.build_job(directory, provider, relay, settings, clock=later)
        run = await job.run_once()
        assert (run.items, run.failures) == (1, 0)
        async with directory.connection(MERCHANT) as conn:
            settled = await store.get_payment(conn, MERCHANT, payment.payment_id)
            outbox = await conn.fetch("SELECT event_type FROM outbox ORDER BY id")
        assert settled is not None and settled.state is settled_state and settled.pending is None
        expected_event = "payment.captured" if settled_state is PaymentState.CAPTURED else "payment.failed"
        assert [row["event_type"] for row in outbox] == [expected_event]
        assert relay.notified == [MERCHANT]
        # The job never charges: the provider holds what it held before.
        assert len(await simulator.transactions(payment.provider_order_reference)) == charges
        assert uuid.UUID(request.product_id) == uuid.UUID(settled.product_id)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await provider.aclose()
        await directory.close()
        await drop_databases(settings, settings.db_prefix)
        await delete_broker_objects(settings)
