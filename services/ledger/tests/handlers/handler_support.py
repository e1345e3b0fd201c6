"""What the handler tests share: the run's subjects, a publisher standing in for the payment
gateway (envelopes on the events exchange, as its relay sends them), the parking queue read
back, the payment events themselves, and SQL probes of a merchant's ledger."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from catalog_harness import RunningCatalog
from google.protobuf.message import Message
from tally.common.v1.event_pb2 import EventEnvelope
from tally.common.v1.money_pb2 import Money
from tally.payment_gateway.v1 import events_pb2 as payment_events
from tally_kit.db import MerchantDirectory
from tally_kit.events import CONTENT_TYPE, declare_events_exchange, make_envelope
from tally_kit.events.topology import parking_queue_name
from tally_ledger.catalog_client import GrpcCatalogReader
from tally_ledger.settings import LedgerSettings

T = TypeVar("T")


class RecordingRelay:
    def __init__(self) -> None:
        self.notified: list[str] = []

    def notify(self, merchant_id: str) -> None:
        self.notified.append(merchant_id)


class PaymentGateway:
    """Publishes payment events as the gateway's relay would, and reads the ledger's parking queue."""

    def __init__(self, settings: LedgerSettings, service: str) -> None:
        self._settings = settings
        self._parking_queue = parking_queue_name(service)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self._settings.amqp_url.get_secret_value())
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await declare_events_exchange(self._channel, self._settings.events_exchange)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def publish(self, envelope: EventEnvelope) -> None:
        assert self._exchange is not None
        await self._exchange.publish(
            aio_pika.Message(
                body=envelope.SerializeToString(),
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=envelope.event_id,
                type=envelope.event_type,
            ),
            routing_key=envelope.event_type,
        )

    async def take_parked(self) -> list[str]:
        """The message ids waiting in the parking queue, taken off it."""
        assert self._channel is not None
        queue = await self._channel.get_queue(self._parking_queue, ensure=False)
        taken: list[str] = []
        while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
            taken.append(message.message_id or "")
            await message.ack()
        return taken


@dataclass(frozen=True)
class Subjects:
    catalog: RunningCatalog
    settings: LedgerSettings
    directory: MerchantDirectory
    reader: GrpcCatalogReader
    relay: RecordingRelay
    gateway: PaymentGateway


def envelope(event_type: str, merchant_id: str, payload: Message) -> EventEnvelope:
    return make_envelope(
        event_type=event_type,
        merchant_id=merchant_id,
        payload=payload,
        producer="payment-gateway",
        correlation_id=str(uuid.uuid4()),
    )


@dataclass(frozen=True)
class Payment:
    """One captured payment of an order, and the events the gateway tells about it."""

    merchant_id: str
    product_id: str
    user_id: str
    order_id: str
    payment_id: str
    amount_minor: int = 990

    @classmethod
    def new(cls, merchant_id: str, product_id: str) -> Payment:
        return cls(
            merchant_id=merchant_id,
            product_id=product_id,
            user_id=f"user-{secrets.token_hex(4)}",
            order_id=f"order-{secrets.token_hex(6)}",
            payment_id=f"pay-{secrets.token_hex(6)}",
        )

    def captured(self) -> EventEnvelope:
        return envelope("payment.captured", self.merchant_id, self.capture())

    def capture(self) -> payment_events.PaymentCaptured:
        event = payment_events.PaymentCaptured(
            merchant_id=self.merchant_id,
            user_id=self.user_id,
            order_id=self.order_id,
            product_id=self.product_id,
            payment_id=self.payment_id,
            amount=Money(amount_minor=self.amount_minor, currency="EUR"),
            provider_reference=f"psp-{self.payment_id}",
        )
        event.capture_time.GetCurrentTime()
        return event

    def refunded(self, amount_minor: int) -> EventEnvelope:
        event = payment_events.PaymentRefunded(
            merchant_id=self.merchant_id,
            user_id=self.user_id,
            order_id=self.order_id,
            product_id=self.product_id,
            payment_id=self.payment_id,
            amount=Money(amount_minor=self.amount_minor, currency="EUR"),
            provider_reference=f"psp-refund-{self.payment_id}",
            refund_id=f"refund-{secrets.token_hex(6)}",
            refunded_amount=Money(amount_minor=amount_minor, currency="EUR"),
            total_refunded=Money(amount_minor=amount_minor, currency="EUR"),
        )
        event.refund_time.GetCurrentTime()
        return envelope("payment.refunded", self.merchant_id, event)

    def charged_back(self) -> EventEnvelope:
        event = payment_events.PaymentChargeback(
            merchant_id=self.merchant_id,
            user_id=self.user_id,
            order_id=self.order_id,
            product_id=self.product_id,
            payment_id=self.payment_id,
            amount=Money(amount_minor=self.amount_minor, currency="EUR"),
            provider_reference=f"psp-{self.payment_id}",
            chargeback_id=f"dispute-{secrets.token_hex(6)}",
            chargeback_amount=Money(amount_minor=self.amount_minor, currency="EUR"),
        )
        event.chargeback_time.GetCurrentTime()
        return envelope("payment.chargeback", self.merchant_id, event)


async def eventually(
    read: Callable[[], Awaitable[T]], accept: Callable[[T], bool], *, within: float = 10.0
) -> T:
    """The first value `read` returns that `accept`s, polling for at most `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await read()
        if accept(value):
            return value
        assert asyncio.get_running_loop().time() < deadline, f"not accepted within {within} s: {value}"
        await asyncio.sleep(0.05)


async def order_lots(directory: MerchantDirectory, merchant_id: str, order_id: str) -> list[asyncpg.Record]:
    """The lots of an order: (lot_id, credits, remaining, reversal); none while the merchant
    has no ledger database."""
    if not await directory.is_provisioned(merchant_id):
        return []
    async with directory.connection(merchant_id) as conn:
        return await conn.fetch(
            "SELECT lot_id, credits, remaining, reversal FROM lots WHERE merchant_id = $1 AND order_id = $2",
            merchant_id,
            order_id,
        )


async def inbox_ids(directory: MerchantDirectory, merchant_id: str) -> set[str]:
    """The ids of the events the merchant's ledger applied; none while it has no database."""
    if not await directory.is_provisioned(merchant_id):
        return set()
    async with directory.connection(merchant_id) as conn:
        rows = await conn.fetch("SELECT event_id FROM inbox WHERE merchant_id = $1", merchant_id)
    return {str(row["event_id"]) for row in rows}
