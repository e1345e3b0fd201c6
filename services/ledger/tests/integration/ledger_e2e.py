"""What the ledger's end-to-end tests share: a client of the running ledger over gRPC with real
tokens, probes of its databases and a RabbitMQ queue capturing what it publishes.

The catalog runs beside it, in the same process, as the real app; its own end-to-end
helpers (client, database probes, event capture, status decoding) are reused as they are.
Routing keys and error reasons are spelled out as the API documents them, never imported
from the service, so that a renamed key or reason fails a test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aio_pika
import grpc
from google.protobuf.message import Message
from tally.common.v1.event_pb2 import EventEnvelope
from tally.ledger.v1 import ledger_service_pb2_grpc
from tally_catalog.testing import (
    CALL_TIMEOUT_SECONDS,
    CapturedEvent,
    Catalog,
    Databases,
    EventCapture,
    Refusal,
    catalog_settings,
    eventually,
    manual_grant_product,
    new_id,
    new_merchant_id,
    refusal_of,
    sellable_product,
)
from tally_kit.auth import issue_dev_token
from tally_kit.events import CONTENT_TYPE
from tally_kit.events.topology import dead_letter_exchange_name, events_queue_name, parking_queue_name
from tally_ledger.settings import LedgerSettings

# What the ledger's tests take from the catalog's helpers, through this module.
__all__ = [
    "CapturedEvent",
    "Catalog",
    "Databases",
    "EventCapture",
    "Ledger",
    "catalog_settings",
    "delete_consumer_topology",
    "eventually",
    "ledger_settings",
    "manual_grant_product",
    "new_id",
    "new_merchant_id",
    "sellable_product",
]

PRODUCER = "ledger"


def ledger_settings(prefix: str, catalog_target: str, **overrides: object) -> LedgerSettings:
    """Settings of a ledger of this run: the run's database prefix, an exchange of its own,
    small pools, and the catalog at `catalog_target`."""
    values: dict[str, object] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "db_prefix": prefix,
        "events_exchange": f"{prefix}ledger.e2e",
        # The PostgreSQL server is shared with other test runs.
        "db_max_pools": 4,
        "db_pool_max_size": 3,
        "db_max_connections": 8,
        "shutdown_grace_seconds": 5.0,
        "catalog_target": catalog_target,
        # The payment-event consumer's queues, of this run only.
        "consumer_name": f"{prefix}ledger",
        **overrides,
    }
    return LedgerSettings(**values)  # type: ignore[arg-type]


@dataclass
class Ledger:
    """A running ledger seen from outside: its stub, its databases, its published events."""

    settings: LedgerSettings
    channel: grpc.aio.Channel
    databases: Databases
    events: EventCapture
    stub: ledger_service_pb2_grpc.LedgerServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = ledger_service_pb2_grpc.LedgerServiceStub(self.channel)

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
        """The response of `LedgerService/<rpc>` (typed by the RPC, hence Any)."""
        metadata = [("x-request-id", correlation_id or new_id())]
        if role is not None:
            metadata.append(("authorization", f"Bearer {self.token(role, merchant_id)}"))
        return await getattr(self.stub, rpc)(request, metadata=tuple(metadata), timeout=CALL_TIMEOUT_SECONDS)

    async def refuse(
        self, rpc: str, request: Message, *, role: str | None = "platform", merchant_id: str | None = None
    ) -> Refusal:
        """The refusal of a call expected to fail; a success fails the test."""
        try:
            response = await self.call(rpc, request, role=role, merchant_id=merchant_id)
        except grpc.aio.AioRpcError as error:
            return refusal_of(error)
        raise AssertionError(f"{rpc} succeeded instead of being refused: {response}")

    async def published_events(self, merchant_id: str, correlation_id: str) -> list[CapturedEvent]:
        """Every event delivered for one call, once the merchant's outbox is fully published
        (a published row has the broker's confirm, so the capture queue holds it)."""

        async def settled() -> bool:
            rows = await self.databases.outbox(merchant_id)
            if not all(row.published for row in rows):
                return False
            of_call = {row.event_id for row in rows if row.correlation_id == correlation_id}
            return of_call <= self.events.event_ids()

        await eventually(settled)
        return self.events.of_call(correlation_id)

    async def publish(self, envelope: EventEnvelope) -> None:
        """Publishes an event on the ledger's exchange as another service's relay would."""
        async with await aio_pika.connect(self.settings.amqp_url.get_secret_value()) as connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(self.settings.events_exchange, ensure=False)
            await exchange.publish(
                aio_pika.Message(
                    body=envelope.SerializeToString(),
                    content_type=CONTENT_TYPE,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=envelope.event_id,
                    type=envelope.event_type,
                ),
                routing_key=envelope.event_type,
            )


async def delete_consumer_topology(settings: LedgerSettings) -> None:
    """Deletes the queues and dead-letter exchange the ledger's consumer declared (if any)."""
    name = settings.consumer_name
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        channel = await connection.channel()
        for queue in (events_queue_name(name), parking_queue_name(name)):
            await channel.queue_delete(queue)
        await channel.exchange_delete(dead_letter_exchange_name(name))
