"""Test support, for the receipt service's tests and the cross-service suite (never imported by the
service itself). What the receipt service's integration tests share: the real catalog and
receipt apps in this process, a publisher standing in for the ledger on the events exchange, a
queue capturing what the receipt service publishes, and clients of both services over gRPC with
real JWTs.

Routing keys and error reasons are spelled out as the APIs document them, never imported
from the service, so that a renamed key or reason fails a test.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika
import asyncpg
import grpc
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from pypdf import PdfReader
from tally.catalog.v1 import catalog_service_pb2 as catalog_api
from tally.catalog.v1 import catalog_service_pb2_grpc
from tally.catalog.v1 import resources_pb2 as catalog_res
from tally.common.v1.event_pb2 import EventEnvelope
from tally.common.v1.money_pb2 import Money
from tally.ledger.v1 import events_pb2 as ledger_events
from tally.receipt.v1 import receipt_service_pb2 as api
from tally.receipt.v1 import receipt_service_pb2_grpc
from tally_catalog.settings import CatalogSettings
from tally_kit.auth import issue_dev_token
from tally_kit.events import CONTENT_TYPE, declare_events_exchange, make_envelope, unpack_payload
from tally_kit.events.topology import (
    dead_letter_exchange_name,
    events_queue_name,
    parking_queue_name,
    unrouted_exchange_name,
    unrouted_queue_name,
)
from tally_kit.settings import ServiceSettings

from tally_receipt.settings import ReceiptSettings

CALL_TIMEOUT_SECONDS = 10.0
SETTLE_TIME = datetime(2035, 2, 3, 4, 5, 6, tzinfo=UTC)

# The server is shared with other test runs: small pools.
_SMALL_POOLS: dict[str, object] = {
    "grpc_host": "127.0.0.1",
    "grpc_port": 0,
    "metrics_port": 0,
    "db_max_pools": 4,
    "db_pool_max_size": 2,
    "db_max_connections": 6,
    "shutdown_grace_seconds": 5.0,
}


def catalog_settings(prefix: str, exchange: str) -> CatalogSettings:
    return CatalogSettings(db_prefix=prefix, events_exchange=exchange, **_SMALL_POOLS)  # type: ignore[arg-type]


def receipt_settings(prefix: str, exchange: str, catalog_port: int, **overrides: object) -> ReceiptSettings:
    values: dict[str, object] = {
        **_SMALL_POOLS,
        "db_prefix": prefix,
        "events_exchange": exchange,
        "catalog_target": f"127.0.0.1:{catalog_port}",
        "consumer_name": f"{prefix}receipt",
        "consumer_delivery_limit": 3,
        # Read the merchant's configuration afresh for every document.
        "merchant_config_ttl_seconds": 0,
        **overrides,
    }
    return ReceiptSettings(**values)  # type: ignore[arg-type]


def new_id() -> str:
    return str(uuid.uuid4())


def new_merchant_id(label: str) -> str:
    return f"{label}-{secrets.token_hex(3)}"


async def eventually(check: Callable[[], Awaitable[bool] | bool], *, within: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        assert asyncio.get_running_loop().time() < deadline, f"condition not met within {within} s"
        await asyncio.sleep(0.05)


def pdf_text(document: bytes) -> str:
    reader = PdfReader(io.BytesIO(document))
    return "\n".join(page.extract_text() for page in reader.pages)


# --- the ledger's events ------------------------------------------------------------------------


def purchase_settled(
    merchant_id: str, user_id: str, order_id: str, amount_minor: int, currency: str = "EUR"
) -> ledger_events.PurchaseSettled:
    event = ledger_events.PurchaseSettled(
        merchant_id=merchant_id,
        user_id=user_id,
        order_id=order_id,
        product_id=new_id(),
        product_name="Starter pack",
        amount_paid=Money(amount_minor=amount_minor, currency=currency),
        provider_reference=f"psp-{secrets.token_hex(4)}",
        lot_id=new_id(),
    )
    event.credits.value = "100"
    event.settle_time.FromDatetime(SETTLE_TIME)
    return event


def refund_applied(
    merchant_id: str, user_id: str, order_id: str, amount_minor: int, reference: str
) -> ledger_events.RefundApplied:
    return ledger_events.RefundApplied(
        merchant_id=merchant_id,
        user_id=user_id,
        order_id=order_id,
        refund_reference=reference,
        amount_refunded=Money(amount_minor=amount_minor, currency="EUR"),
    )


class Ledger:
    """Publishes events on the exchange as the ledger's outbox relay does."""

    def __init__(self, amqp_url: str, exchange: str) -> None:
        self._amqp_url = amqp_url
        self._exchange_name = exchange
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect(self._amqp_url)
        channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await declare_events_exchange(channel, self._exchange_name)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def publish(self, event_type: str, payload: Message, *, merchant_id: str) -> EventEnvelope:
        envelope = make_envelope(
            event_type=event_type, merchant_id=merchant_id, payload=payload, producer="ledger"
        )
        await self.publish_envelope(envelope)
        return envelope

    async def publish_envelope(self, envelope: EventEnvelope) -> None:
        await self.publish_raw(
            envelope.SerializeToString(), envelope.event_type, message_id=envelope.event_id
        )

    async def publish_raw(self, body: bytes, routing_key: str, *, message_id: str) -> None:
        assert self._exchange is not None
        await self._exchange.publish(
            aio_pika.Message(
                body=body,
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
            ),
            routing_key=routing_key,
        )


class EventCapture:
    """A queue bound to the exchange with `receipt.#`: every event the receipt service publishes."""

    def __init__(self, amqp_url: str, exchange: str) -> None:
        self._amqp_url = amqp_url
        self._exchange = exchange
        self.received: list[tuple[str, Message]] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._queue: AbstractQueue | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect(self._amqp_url)
        channel = await self._connection.channel()
        exchange = await declare_events_exchange(channel, self._exchange)
        self._queue = await channel.declare_queue(f"{self._exchange}.capture", exclusive=True)
        await self._queue.bind(exchange, "receipt.#")
        await self._queue.consume(self._on_message, no_ack=True)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        envelope = EventEnvelope.FromString(message.body)
        self.received.append((message.routing_key or "", unpack_payload(envelope)))

    def of_type(self, routing_key: str) -> list[Message]:
        return [payload for key, payload in self.received if key == routing_key]


async def delete_topology(channel: AbstractChannel, exchange: str, consumer_names: list[str]) -> None:
    """Every queue and exchange the run declared on the broker."""
    for name in consumer_names:
        await channel.queue_delete(events_queue_name(name))
        await channel.queue_delete(parking_queue_name(name))
        await channel.exchange_delete(dead_letter_exchange_name(name))
    await channel.exchange_delete(exchange)
    await channel.exchange_delete(unrouted_exchange_name(exchange))
    await channel.queue_delete(unrouted_queue_name(exchange))


async def database_exists(settings: ServiceSettings, name: str) -> bool:
    conn = await asyncpg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=settings.pg_password.get_secret_value() or None,
        database="postgres",
    )
    try:
        return bool(await conn.fetchval("SELECT true FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def parked_messages(amqp_url: str, consumer_name: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(parking_queue_name(consumer_name), passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await connection.close()


# --- clients ------------------------------------------------------------------------------------


def merchant_config(legal_name: str = "Acme SAS", prefix: str = "ACME") -> catalog_res.MerchantConfig:
    return catalog_res.MerchantConfig(
        legal_name=legal_name,
        tax_id="FR40303265045",
        address=catalog_res.PostalAddress(
            address_lines=["1 rue de la Paix"], locality="Paris", postal_code="75002", region_code="FR"
        ),
        receipt_series_prefix=prefix,
        tax_regime=catalog_res.TaxRegime(rate_percent="20", prices_include_tax=True),
        operation_timeout=Duration(seconds=900),
        retention_days=3650,
        default_currency="EUR",
    )


class Catalog:
    def __init__(self, settings: ServiceSettings, channel: grpc.aio.Channel) -> None:
        self._settings = settings
        self._stub = catalog_service_pb2_grpc.CatalogServiceStub(channel)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = issue_dev_token(self._settings, role="platform", merchant_id=None)
        return (("authorization", f"Bearer {token}"),)

    async def create_merchant(self, merchant_id: str, config: catalog_res.MerchantConfig) -> None:
        await self._stub.CreateMerchant(
            catalog_api.CreateMerchantRequest(merchant_id=merchant_id, request_id=new_id(), config=config),
            metadata=self._metadata(),
            timeout=CALL_TIMEOUT_SECONDS,
        )

    async def rename_merchant(self, merchant_id: str, legal_name: str) -> None:
        request = catalog_api.UpdateMerchantConfigRequest(
            merchant_id=merchant_id,
            request_id=new_id(),
            config=catalog_res.MerchantConfig(legal_name=legal_name),
        )
        request.update_mask.paths.append("legal_name")
        await self._stub.UpdateMerchantConfig(
            request, metadata=self._metadata(), timeout=CALL_TIMEOUT_SECONDS
        )


class Receipts:
    """A client of the receipt service, calling as a merchant's upstream application by default."""

    def __init__(self, settings: ReceiptSettings, channel: grpc.aio.Channel) -> None:
        self._settings = settings
        self.stub = receipt_service_pb2_grpc.ReceiptServiceStub(channel)

    def metadata(self, merchant_id: str | None, role: str = "app") -> tuple[tuple[str, str], ...]:
        token = issue_dev_token(self._settings, role=role, merchant_id=merchant_id)
        return (("authorization", f"Bearer {token}"),)

    async def list(
        self, merchant_id: str, user_id: str, page_size: int = 0, page_token: str = ""
    ) -> api.ListReceiptsResponse:
        return await self.stub.ListReceipts(
            api.ListReceiptsRequest(
                merchant_id=merchant_id, user_id=user_id, page_size=page_size, page_token=page_token
            ),
            metadata=self.metadata(merchant_id),
            timeout=CALL_TIMEOUT_SECONDS,
        )

    async def get(self, merchant_id: str, receipt_id: str) -> api.GetReceiptResponse:
        return await self.stub.GetReceipt(
            api.GetReceiptRequest(merchant_id=merchant_id, receipt_id=receipt_id),
            metadata=self.metadata(merchant_id),
            timeout=CALL_TIMEOUT_SECONDS,
        )

    async def receipt_of_order(
        self, merchant_id: str, user_id: str, order_id: str
    ) -> api.GetReceiptResponse | None:
        for receipt in (await self.list(merchant_id, user_id, page_size=500)).receipts:
            if receipt.order_id == order_id:
                return await self.get(merchant_id, receipt.receipt_id)
        return None

    async def wait_for_receipt(self, merchant_id: str, user_id: str, order_id: str) -> api.GetReceiptResponse:
        found: list[api.GetReceiptResponse] = []

        async def issued() -> bool:
            response = await self.receipt_of_order(merchant_id, user_id, order_id)
            if response is not None:
                found.append(response)
            return response is not None

        await eventually(issued)
        return found[-1]

    async def wait_for_credit_notes(
        self, merchant_id: str, receipt_id: str, count: int
    ) -> api.GetReceiptResponse:
        found: list[api.GetReceiptResponse] = []

        async def issued() -> bool:
            found.append(await self.get(merchant_id, receipt_id))
            return len(found[-1].credit_notes) >= count

        await eventually(issued)
        return found[-1]


@dataclass
class Stack:
    settings: ReceiptSettings
    catalog_port: int
    catalog: Catalog
    receipts: Receipts
    ledger: Ledger
    events: EventCapture
