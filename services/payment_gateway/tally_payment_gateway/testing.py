"""Test support, for the payment gateway's tests and the cross-service suite (never imported by the
service itself). What the payment gateway's servicer and integration tests share: the PSP
simulator as a real process, the real app in this process (gRPC on port 0, PostgreSQL, RabbitMQ,
its notification consumer), a webhook receiver standing in for the HTTP gateway, and a client of
it all.

Each merchant of a run has an Authorize.Net account of its own at the simulator, and one of
three ways to get its webhooks:

- `FORWARD`: the receiver hands each notification to `HandleProviderWebhook` at once, as the
  HTTP gateway does;
- `HOLD`: the receiver keeps them for the test, which forwards them when and in the order it
  wants (or not at all);
- `NONE`: the account has no webhook URL; only the reconciliation job learns what the
  provider did.

The catalog's end-to-end helpers (status decoding, database probes, event capture) are reused
as they are. Routing keys and error reasons are spelled out as the API documents them, never
imported from the service, so that a renamed key or reason fails a test.
"""

from __future__ import annotations

import asyncio
import enum
import json
import secrets
import socket
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import grpc
import httpx
import uvicorn
from google.api import httpbody_pb2
from google.protobuf.message import Message
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tally.common.v1.money_pb2 import Money
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as api
from tally.payment_gateway.v1 import payment_gateway_service_pb2_grpc
from tally.payment_gateway.v1 import resources_pb2 as res
from tally_catalog.testing import (
    CALL_TIMEOUT_SECONDS,
    CapturedEvent,
    Databases,
    EventCapture,
    Refusal,
    eventually,
    refusal_of,
)
from tally_kit.auth import issue_dev_token
from tally_kit.events.topology import (
    dead_letter_exchange_name,
    events_queue_name,
    parking_queue_name,
    unrouted_exchange_name,
    unrouted_queue_name,
)
from tally_kit.jobs import JobRun
from tally_kit.testing import drop_databases, unique_prefix

from tally_payment_gateway import reconciliation
from tally_payment_gateway.app import Wiring, service_app, wire
from tally_payment_gateway.handlers import consumer_name
from tally_payment_gateway.settings import AuthorizeNetAccount, PaymentGatewaySettings

__all__ = [
    "CapturedEvent",
    "Databases",
    "EventCapture",
    "Refusal",
    "eventually",
    "refusal_of",
]

ERROR_DOMAIN = "payment_gateway.tally"
DESCRIPTOR = "COMMON.ACCEPT.INAPP.PAYMENT"
# The simulator's timings, and the adapter's patience: `slow` answers well inside it, `timeout`
# and `lost` well beyond it.
SLOW_SECONDS = 0.25
HANG_SECONDS = 3.0
PROVIDER_TIMEOUT_SECONDS = 1.0
STARTUP_SECONDS = 15.0
# How long a test waits for what happens in the background (webhooks, events). Generous: the
# machine, PostgreSQL and RabbitMQ are shared with other test runs; nothing waits this long
# when all goes well.
WAIT_SECONDS = 20.0
LISTENING = "psp_simulator listening on "


class Webhooks(enum.Enum):
    FORWARD = "forward"
    HOLD = "hold"
    NONE = "none"


def new_id() -> str:
    return str(uuid.uuid4())


def one_time_token(outcome: str = "approve") -> api.PaymentSource:
    """A one-time token the simulator answers with `outcome` (approve, decline, error, review,
    slow, timeout, server-error, lost). Its random part is a UUID: random hexadecimal digits
    run together can line up like a card number, which the gateway refuses."""
    return api.PaymentSource(
        one_time_token=api.OneTimeToken(descriptor=DESCRIPTOR, value=f"sim-{outcome}-{new_id()}")
    )


def usd(amount_minor: int) -> Money:
    return Money(amount_minor=amount_minor, currency="USD")


# --- the simulator --------------------------------------------------------------------------


@dataclass(frozen=True)
class Simulator:
    url: str
    # For the control endpoints.
    client: httpx.AsyncClient

    async def control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self.client.request(method, f"/_simulator{path}", json=body)
        response.raise_for_status()
        return response.json()

    async def transactions(self, invoice_number: str) -> list[dict[str, Any]]:
        found = await self.control("GET", f"/transactions?invoiceNumber={invoice_number}")
        return found["transactions"]

    async def settle(self) -> None:
        await self.control("POST", "/settle")

    async def script(self, outcome: str, **match: str) -> None:
        await self.control("POST", "/script", {"outcome": outcome, **match})

    async def add_account(self, account: AuthorizeNetAccount, webhook_url: str | None) -> None:
        await self.control(
            "PUT",
            f"/accounts/{account.api_login_id}",
            {
                "transactionKey": account.transaction_key.get_secret_value(),
                "signatureKey": account.signature_key.get_secret_value(),
                "webhookUrl": webhook_url,
            },
        )


@asynccontextmanager
async def running_simulator(webhook_url: str | None = None) -> AsyncIterator[Simulator]:
    """The simulator as a process on a free port; `webhook_url` (with `{merchant}`) is where
    the accounts it opens per merchant send their notifications."""
    webhook = ("--webhook-url", webhook_url) if webhook_url is not None else ()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "psp_simulator",
        "--port",
        "0",
        "--slow-seconds",
        str(SLOW_SECONDS),
        "--hang-seconds",
        str(HANG_SECONDS),
        *webhook,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(STARTUP_SECONDS):
            line = (await process.stdout.readline()).decode()
        assert line.startswith(LISTENING), line
        url = line.removeprefix(LISTENING).strip()
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            yield Simulator(url, client)
    finally:
        process.terminate()
        try:
            async with asyncio.timeout(STARTUP_SECONDS):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def new_account() -> AuthorizeNetAccount:
    return AuthorizeNetAccount(
        api_login_id=f"t-{secrets.token_hex(6)}",
        transaction_key=SecretStr(secrets.token_hex(8)),
        signature_key=SecretStr(secrets.token_hex(64).upper()),
    )


# --- the webhook receiver -------------------------------------------------------------------


@dataclass
class Notification:
    """A webhook as the provider sent it: its headers (names in lower case) and raw body."""

    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """The HTTP gateway's part in a webhook: the raw body and headers to `HandleProviderWebhook`."""

    def __init__(self) -> None:
        self.modes: dict[str, Webhooks] = {}
        self.held: defaultdict[str, asyncio.Queue[Notification]] = defaultdict(asyncio.Queue)
        self._stash: defaultdict[str, list[Notification]] = defaultdict(list)
        self.stub: payment_gateway_service_pb2_grpc.PaymentGatewayServiceStub | None = None
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/webhooks"
        app = Starlette(routes=[Route("/webhooks/{merchant_id}", self._receive, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self._serving: asyncio.Task[None] | None = None

    def url(self, merchant_id: str) -> str:
        return f"{self.base_url}/{merchant_id}"

    async def start(self) -> None:
        # Listening before uvicorn starts: deliveries that come early wait in the backlog.
        self._listener.listen()
        self._serving = asyncio.create_task(self._server.serve(sockets=[self._listener]))

    async def close(self) -> None:
        self._server.should_exit = True
        if self._serving is not None:
            await self._serving

    async def take_held(
        self, merchant_id: str, event_type: str, transaction_id: str, *, within: float = WAIT_SECONDS
    ) -> Notification:
        """The held notification of `event_type` about the provider transaction, once it came;
        the others stay held (the simulator delivers in the background, in any order)."""
        async with asyncio.timeout(within):
            while True:
                for notification in self._stash[merchant_id]:
                    document = json.loads(notification.body)
                    if (document["eventType"], document["payload"]["id"]) == (event_type, transaction_id):
                        self._stash[merchant_id].remove(notification)
                        return notification
                self._stash[merchant_id].append(await self.held[merchant_id].get())

    async def _receive(self, request: Request) -> Response:
        merchant_id = request.path_params["merchant_id"]
        notification = Notification(dict(request.headers), await request.body())
        if self.modes.get(merchant_id) is Webhooks.HOLD:
            await self.held[merchant_id].put(notification)
            return Response(status_code=200)
        assert self.stub is not None
        try:
            await self.stub.HandleProviderWebhook(webhook_request(merchant_id, notification), timeout=5)
        except grpc.aio.AioRpcError as error:
            status = 401 if error.code() is grpc.StatusCode.UNAUTHENTICATED else 503
            return Response(status_code=status)
        return Response(status_code=200)


def webhook_request(merchant_id: str, notification: Notification) -> api.HandleProviderWebhookRequest:
    return api.HandleProviderWebhookRequest(
        merchant_id=merchant_id,
        provider="authorize_net",
        body=httpbody_pb2.HttpBody(
            content_type=notification.headers.get("content-type", "application/json"), data=notification.body
        ),
        headers=notification.headers,
    )


# --- the gateway ------------------------------------------------------------------------------


class LaterClock:
    """The reconciliation job's clock in tests: real time plus an offset the tests move, so a
    call can be made overdue without waiting (the service's own clock stays real)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Gateway:
    """The running app seen from outside, and the parts of it tests reach past its API for."""

    settings: PaymentGatewaySettings
    wiring: Wiring
    channel: grpc.aio.Channel
    simulator: Simulator
    receiver: WebhookReceiver
    databases: Databases
    events: EventCapture
    accounts: Mapping[str, AuthorizeNetAccount]
    reconciliation_clock: LaterClock
    stub: payment_gateway_service_pb2_grpc.PaymentGatewayServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = payment_gateway_service_pb2_grpc.PaymentGatewayServiceStub(self.channel)

    def token(self, role: str, merchant_id: str | None = None) -> str:
        return issue_dev_token(self.settings, role=role, merchant_id=merchant_id)

    async def call(
        self,
        rpc: str,
        request: Message,
        *,
        role: str | None = "platform",
        merchant_id: str | None = None,
        correlation_id: str | None = None,
    ) -> Any:
        """The response of `PaymentGatewayService/<rpc>` (typed by the RPC, hence Any)."""
        metadata = [("x-request-id", correlation_id or new_id())]
        if role is not None:
            metadata.append(("authorization", f"Bearer {self.token(role, merchant_id)}"))
        return await getattr(self.stub, rpc)(request, metadata=tuple(metadata), timeout=CALL_TIMEOUT_SECONDS)

    async def refuse(self, rpc: str, request: Message, *, role: str | None = "platform") -> Refusal:
        """The refusal of a call expected to fail; a success fails the test."""
        try:
            response = await self.call(rpc, request, role=role)
        except grpc.aio.AioRpcError as error:
            return refusal_of(error)
        raise AssertionError(f"{rpc} succeeded instead of being refused: {response}")

    async def purchase(
        self,
        merchant_id: str,
        *,
        outcome: str = "approve",
        amount_minor: int = 1234,
        source: api.PaymentSource | None = None,
        request_id: str | None = None,
        correlation_id: str | None = None,
        order_id: str | None = None,
    ) -> res.Payment:
        response = await self.call(
            "Purchase",
            self.purchase_request(
                merchant_id,
                outcome=outcome,
                amount_minor=amount_minor,
                source=source,
                request_id=request_id,
                order_id=order_id,
            ),
            correlation_id=correlation_id,
        )
        return response.payment

    @staticmethod
    def purchase_request(
        merchant_id: str,
        *,
        outcome: str = "approve",
        amount_minor: int = 1234,
        source: api.PaymentSource | None = None,
        request_id: str | None = None,
        order_id: str | None = None,
    ) -> api.PurchaseRequest:
        return api.PurchaseRequest(
            merchant_id=merchant_id,
            request_id=request_id or new_id(),
            user_id="user-1",
            order_id=order_id or f"order-{secrets.token_hex(6)}",
            product_id=str(uuid.uuid4()),
            amount=usd(amount_minor),
            payment_source=source or one_time_token(outcome),
            description="100 credits",
        )

    async def authorize(self, merchant_id: str, *, amount_minor: int = 1234) -> res.Payment:
        request = api.AuthorizeRequest(
            merchant_id=merchant_id,
            request_id=new_id(),
            user_id="user-1",
            order_id=f"order-{secrets.token_hex(6)}",
            product_id=str(uuid.uuid4()),
            amount=usd(amount_minor),
            payment_source=one_time_token(),
        )
        return (await self.call("Authorize", request)).payment

    async def payment(self, merchant_id: str, payment_id: str) -> res.Payment:
        request = api.GetPaymentRequest(merchant_id=merchant_id, payment_id=payment_id)
        return (await self.call("GetPayment", request)).payment

    async def payment_in(
        self, merchant_id: str, payment_id: str, state: int, *, within: float = WAIT_SECONDS
    ) -> res.Payment:
        """The payment once it reaches `state` (a webhook or the job moves it in the background)."""
        found: list[res.Payment] = []

        async def reached() -> bool:
            found[:] = [await self.payment(merchant_id, payment_id)]
            return found[0].state == state

        await eventually(reached, within=within)
        return found[0]

    async def reconcile(self, *, later: timedelta = timedelta()) -> JobRun:
        """One run of the reconciliation job, with its clock `later` than now."""
        self.reconciliation_clock.offset = later
        job = reconciliation.build_job(
            self.wiring.directory,
            self.wiring.provider,
            self.wiring.relay,
            self.settings,
            clock=self.reconciliation_clock,
        )
        return await job.run_once()

    async def audit(self, merchant_id: str, payment_id: str) -> list[tuple[str | None, str]]:
        """(state before, state after) of every audit row of the payment, oldest first."""
        rows = await self.databases.fetch(
            merchant_id,
            "SELECT state_before, state_after FROM payment_audit WHERE payment_id = $1 ORDER BY audit_id",
            uuid.UUID(payment_id),
        )
        return [(row["state_before"], row["state_after"]) for row in rows]

    async def events_of(self, payment_id: str, *, routing_key: str | None = None) -> list[CapturedEvent]:
        """The payment events published about the payment so far."""
        return [
            event
            for event in self.events.received
            if event.routing_key.startswith("payment.")
            and getattr(event.payload, "payment_id", None) == payment_id
            and (routing_key is None or event.routing_key == routing_key)
        ]

    async def event(
        self, payment_id: str, routing_key: str, *, within: float = WAIT_SECONDS
    ) -> CapturedEvent:
        """The one event of `routing_key` about the payment, once published."""
        [found] = await self.published(payment_id, routing_key, 1, within=within)
        return found

    async def published(
        self, payment_id: str, routing_key: str, count: int, *, within: float = WAIT_SECONDS
    ) -> list[CapturedEvent]:
        """The events of `routing_key` about the payment, once `count` are published; more fail."""
        found: list[CapturedEvent] = []

        async def arrived() -> bool:
            found[:] = await self.events_of(payment_id, routing_key=routing_key)
            return len(found) >= count

        await eventually(arrived, within=within)
        assert len(found) == count, found
        return found

    async def processed_notifications(
        self, merchant_id: str, transaction_id: str, count: int, *, within: float = WAIT_SECONDS
    ) -> list[tuple[str, str]]:
        """(event type, outcome) of the notifications about the provider transaction, once `count`
        of them are received and processed, in the order they were received."""
        rows: list[tuple[str, str]] = []

        async def processed() -> bool:
            found = await self.databases.fetch(
                merchant_id,
                """
                SELECT event_type, outcome FROM webhook_notifications
                WHERE entity_id = $1 ORDER BY received_at, notification_id
                """,
                transaction_id,
            )
            rows[:] = [(row["event_type"], row["outcome"]) for row in found]
            return len(rows) >= count and all(outcome is not None for _, outcome in rows)

        try:
            await eventually(processed, within=within)
        except AssertionError:
            raise AssertionError(f"notifications about {transaction_id} after {within} s: {rows}") from None
        assert len(rows) == count, rows
        return rows


def gateway_settings(
    prefix: str, simulator_url: str, accounts: Mapping[str, AuthorizeNetAccount]
) -> PaymentGatewaySettings:
    return PaymentGatewaySettings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        db_prefix=prefix,
        events_exchange=f"{prefix}payment-gateway.tests",
        # The PostgreSQL server is shared with other test runs (and each test folder runs an
        # app of its own for the whole session).
        db_max_pools=4,
        db_pool_max_size=3,
        db_max_connections=6,
        shutdown_grace_seconds=5.0,
        authorize_net_url=simulator_url,
        # Only the run's merchants: no default account.
        authorize_net_accounts=dict(accounts),
        provider_connect_timeout_seconds=1.0,
        provider_timeout_seconds=PROVIDER_TIMEOUT_SECONDS,
        provider_query_attempts=2,
        # The suite provokes outages on purpose: they must not open the circuit for the next test.
        provider_breaker_failure_threshold=10_000,
        consumer_delivery_limit=10,
        # Only the tests run the job (`Gateway.reconcile`), with a clock they move.
        reconciliation_interval_seconds=3600,
    )


@asynccontextmanager
async def running_gateway(webhook_modes: Mapping[str, Webhooks]) -> AsyncIterator[Gateway]:
    """The app with one merchant (and simulator account) per entry of `webhook_modes`."""
    prefix = unique_prefix()
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        async with running_simulator() as simulator:
            accounts = {merchant_id: new_account() for merchant_id in webhook_modes}
            for merchant_id, mode in webhook_modes.items():
                receiver.modes[merchant_id] = mode
                url = None if mode is Webhooks.NONE else receiver.url(merchant_id)
                await simulator.add_account(accounts[merchant_id], url)
            settings = gateway_settings(prefix, simulator.url, accounts)
            async with _running_app(settings, simulator, receiver, accounts) as gateway:
                yield gateway
    finally:
        await receiver.close()


@asynccontextmanager
async def _running_app(
    settings: PaymentGatewaySettings,
    simulator: Simulator,
    receiver: WebhookReceiver,
    accounts: Mapping[str, AuthorizeNetAccount],
) -> AsyncIterator[Gateway]:
    events = EventCapture(settings.amqp_url.get_secret_value(), settings.events_exchange)
    wiring = wire(
        settings,
        consumer_retry_backoff_seconds=0.05,
        consumer_retry_backoff_max_seconds=0.5,
    )
    app = service_app(wiring)
    channel: grpc.aio.Channel | None = None
    try:
        # Bound before the app starts, so that the capture queue sees every event.
        await events.start()
        port = await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        gateway = Gateway(
            settings=settings,
            wiring=wiring,
            channel=channel,
            simulator=simulator,
            receiver=receiver,
            databases=Databases(settings),
            events=events,
            accounts=accounts,
            reconciliation_clock=LaterClock(),
        )
        receiver.stub = gateway.stub
        yield gateway
    finally:
        receiver.stub = None
        if channel is not None:
            await channel.close()
        await app.stop()
        await events.close()
        await drop_databases(settings, settings.db_prefix)
        await delete_broker_objects(settings)


async def delete_broker_objects(settings: PaymentGatewaySettings) -> None:
    """Delete what an app of these settings declared on RabbitMQ: its consumer's queues and
    dead-letter exchange, the events exchange and its alternate exchange and queue (deleting
    what is gone already is no error)."""
    consumer = consumer_name(settings)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        for queue in (
            events_queue_name(consumer),
            parking_queue_name(consumer),
            unrouted_queue_name(settings.events_exchange),
        ):
            await channel.queue_delete(queue)
        for exchange in (
            dead_letter_exchange_name(consumer),
            settings.events_exchange,
            unrouted_exchange_name(settings.events_exchange),
        ):
            await channel.exchange_delete(exchange)
