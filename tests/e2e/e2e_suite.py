"""What the cross-service end-to-end tests share: the settings of one stack (catalog, ledger,
receipt, payment gateway) sharing one events exchange, clients of each service over gRPC with
real tokens, and the probes that tell when the events between them have all been handled.

The services only meet through gRPC and RabbitMQ, as in production: the ledger and the
receipt service read the catalog over gRPC, the ledger consumes the payment gateway's events
and the receipt service the ledger's. SQL only reads what no client can see (outboxes and
inboxes), to wait for the asynchronous outcome of a call without a fixed sleep.

The catalog's end-to-end helpers (requests, database probes, bounded polling), the receipt
service's PDF reader and the payment gateway's simulator launcher are reused as they are,
from each service's `testing` module.
Routing keys are spelled out as the APIs document them, never imported from the services.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from google.protobuf.message import Message
from tally.catalog.v1 import catalog_service_pb2 as catalog_api
from tally.catalog.v1 import catalog_service_pb2_grpc
from tally.catalog.v1 import resources_pb2 as catalog_res
from tally.common.v1.event_pb2 import EventEnvelope
from tally.ledger.v1 import ledger_service_pb2 as ledger_api
from tally.ledger.v1 import ledger_service_pb2_grpc
from tally.ledger.v1 import resources_pb2 as ledger_res
from tally.payment_gateway.v1 import payment_gateway_service_pb2_grpc
from tally.receipt.v1 import receipt_service_pb2 as receipt_api
from tally.receipt.v1 import receipt_service_pb2_grpc
from tally.receipt.v1 import resources_pb2 as receipt_res
from tally_catalog.settings import CatalogSettings
from tally_catalog.testing import (
    CALL_TIMEOUT_SECONDS,
    Databases,
    eventually,
    manual_grant_product,
    merchant_config,
    new_id,
    new_merchant_id,
    sellable_product,
)
from tally_kit.auth import issue_dev_token
from tally_kit.settings import ServiceSettings
from tally_ledger.settings import LedgerSettings
from tally_payment_gateway.settings import SIMULATOR_ACCOUNT, PaymentGatewaySettings
from tally_payment_gateway.testing import Simulator, one_time_token, running_simulator
from tally_receipt.settings import ReceiptSettings
from tally_receipt.testing import pdf_text

# What the tests take from the reused helpers, through this module.
__all__ = [
    "Simulator",
    "eventually",
    "new_id",
    "one_time_token",
    "pdf_text",
    "running_simulator",
]

# How long an event may take to cross the stack (relay, broker, consumer, catalog read).
DELIVERY_SECONDS = 15.0

# The PostgreSQL server is shared with other test runs: small pools for every service.
_SMALL_POOLS: dict[str, object] = {
    "grpc_host": "127.0.0.1",
    "grpc_port": 0,
    "metrics_port": 0,
    "db_max_pools": 4,
    "db_pool_max_size": 3,
    "db_max_connections": 8,
    "shutdown_grace_seconds": 5.0,
}


# --- settings -----------------------------------------------------------------------------------


def catalog_settings(prefix: str, exchange: str) -> CatalogSettings:
    return CatalogSettings(db_prefix=prefix, events_exchange=exchange, **_SMALL_POOLS)  # type: ignore[arg-type]


def ledger_settings(prefix: str, exchange: str, catalog_target: str) -> LedgerSettings:
    return LedgerSettings(
        db_prefix=prefix,
        events_exchange=exchange,
        catalog_target=catalog_target,
        # The payment-event consumer's queues, of this run only.
        consumer_name=f"{prefix}ledger",
        **_SMALL_POOLS,  # type: ignore[arg-type]
    )


def receipt_settings(prefix: str, exchange: str, catalog_target: str) -> ReceiptSettings:
    return ReceiptSettings(
        db_prefix=prefix,
        events_exchange=exchange,
        catalog_target=catalog_target,
        # The ledger-event consumer's queues, of this run only.
        consumer_name=f"{prefix}receipt",
        **_SMALL_POOLS,  # type: ignore[arg-type]
    )


def payment_gateway_settings(prefix: str, exchange: str, simulator_url: str) -> PaymentGatewaySettings:
    # The notification consumer's queues are named after the database prefix, unique to the run.
    return PaymentGatewaySettings(
        db_prefix=prefix,
        events_exchange=exchange,
        authorize_net_url=simulator_url,
        # Every merchant of the run pays through the account the simulator serves by default.
        authorize_net_accounts={"*": SIMULATOR_ACCOUNT},
        **_SMALL_POOLS,  # type: ignore[arg-type]
    )


# --- clients ------------------------------------------------------------------------------------


class Service:
    """One running service seen from outside: its stub on a real channel, called with real
    tokens, and read-only probes of its outbox and inbox."""

    def __init__(self, settings: ServiceSettings, channel: grpc.aio.Channel, stub: Any) -> None:
        self.settings = settings
        self.stub = stub
        self.databases = Databases(settings)
        self._channel = channel

    async def call(
        self, rpc: str, request: Message, *, role: str = "platform", merchant_id: str | None = None
    ) -> Any:
        """The response of `<rpc>` (typed by the RPC, hence Any), called as `role`."""
        token = issue_dev_token(self.settings, role=role, merchant_id=merchant_id)
        metadata = (("authorization", f"Bearer {token}"), ("x-request-id", new_id()))
        return await getattr(self.stub, rpc)(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)

    async def outbox(self, merchant_id: str, event_types: tuple[str, ...]) -> list[EventEnvelope]:
        """The merchant's events of `event_types` this service wrote to its outbox, oldest first
        (none while it has no database)."""
        rows = await self._merchant_rows(
            merchant_id,
            "SELECT envelope FROM outbox WHERE event_type = ANY($1::text[]) ORDER BY id",
            list(event_types),
        )
        return [EventEnvelope.FromString(row["envelope"]) for row in rows or []]

    async def inbox(self, merchant_id: str) -> set[str] | None:
        """Ids of the events handled for the merchant; None while it has no (migrated) database."""
        rows = await self._merchant_rows(merchant_id, "SELECT event_id::text FROM inbox")
        return None if rows is None else {row["event_id"] for row in rows}

    async def _merchant_rows(
        self, merchant_id: str, query: str, *args: object
    ) -> list[asyncpg.Record] | None:
        try:
            return await self.databases.fetch(merchant_id, query, *args)
        except (asyncpg.InvalidCatalogNameError, asyncpg.UndefinedTableError):
            # Not created yet, or still being migrated: it holds nothing yet.
            return None

    async def close(self) -> None:
        await self._channel.close()


def connect(settings: ServiceSettings, port: int, stub_class: type) -> Service:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Service(settings, channel, stub_class(channel))


STUBS: Mapping[str, type] = {
    "catalog": catalog_service_pb2_grpc.CatalogServiceStub,
    "ledger": ledger_service_pb2_grpc.LedgerServiceStub,
    "receipt": receipt_service_pb2_grpc.ReceiptServiceStub,
    "payment_gateway": payment_gateway_service_pb2_grpc.PaymentGatewayServiceStub,
}


@dataclass(frozen=True)
class Hop:
    """Events of `event_types` written to `producer`'s outbox, consumed by `consumer`."""

    producer: str
    consumer: str
    event_types: tuple[str, ...]


# Every route an event takes between the services of the stack, upstream first.
HOPS = (
    Hop("payment_gateway", "ledger", ("payment.captured", "payment.refunded", "payment.chargeback")),
    Hop("ledger", "receipt", ("ledger.purchase_settled", "ledger.refund_applied")),
)


@dataclass(frozen=True)
class Merchant:
    """A merchant created in the catalog, with a sellable product and a manual grant product."""

    merchant_id: str
    config: catalog_res.MerchantConfig
    product: catalog_res.Product
    grant_product: catalog_res.Product


@dataclass
class Stack:
    """The four services of one run and the PSP simulator the payment gateway calls."""

    catalog: Service
    ledger: Service
    receipt: Service
    payment_gateway: Service
    simulator: Simulator

    def service(self, name: str) -> Service:
        services: dict[str, Service] = {
            "catalog": self.catalog,
            "ledger": self.ledger,
            "receipt": self.receipt,
            "payment_gateway": self.payment_gateway,
        }
        return services[name]

    # --- the catalog ----------------------------------------------------------------------------

    async def create_merchant(self, label: str) -> Merchant:
        """A merchant with a legal name and receipt series of its own, a sellable 100-credit
        product "Starter pack" and a manual grant product."""
        merchant_id = new_merchant_id(label)
        series = merchant_id.upper()[-6:]
        config = merchant_config(legal_name=f"{label.title()} {series} SAS", receipt_series_prefix=series)
        created = await self.catalog.call(
            "CreateMerchant",
            catalog_api.CreateMerchantRequest(merchant_id=merchant_id, request_id=new_id(), config=config),
        )
        product = await self._create_product(merchant_id, sellable_product(name="Starter pack"))
        grant_product = await self._create_product(merchant_id, manual_grant_product(name="Welcome credits"))
        return Merchant(merchant_id, created.merchant.config, product, grant_product)

    async def _create_product(self, merchant_id: str, product: catalog_res.Product) -> catalog_res.Product:
        request = catalog_api.CreateProductRequest(
            merchant_id=merchant_id, request_id=new_id(), product=product
        )
        return (await self.catalog.call("CreateProduct", request)).product

    # --- the ledger -----------------------------------------------------------------------------

    async def lots(self, merchant_id: str, user_id: str) -> list[ledger_res.Lot]:
        """Every lot of the user, whatever its state."""
        response = await self.ledger.call(
            "ListLots", ledger_api.ListLotsRequest(merchant_id=merchant_id, user_id=user_id, page_size=500)
        )
        assert response.next_page_token == ""
        return list(response.lots)

    async def balance(self, merchant_id: str, user_id: str) -> ledger_res.Balance:
        request = ledger_api.GetBalanceRequest(merchant_id=merchant_id, user_id=user_id)
        return (await self.ledger.call("GetBalance", request)).balance

    # --- the receipt service --------------------------------------------------------------------

    async def receipts(self, merchant_id: str, user_id: str) -> list[receipt_res.Receipt]:
        """Every receipt of the user, read as the merchant's upstream application."""
        response = await self.receipt.call(
            "ListReceipts",
            receipt_api.ListReceiptsRequest(merchant_id=merchant_id, user_id=user_id, page_size=500),
            role="app",
            merchant_id=merchant_id,
        )
        assert response.next_page_token == ""
        return list(response.receipts)

    async def get_receipt(self, merchant_id: str, receipt_id: str) -> receipt_api.GetReceiptResponse:
        return await self.receipt.call(
            "GetReceipt",
            receipt_api.GetReceiptRequest(merchant_id=merchant_id, receipt_id=receipt_id),
            role="app",
            merchant_id=merchant_id,
        )

    async def only_receipt(self, merchant_id: str, user_id: str) -> receipt_api.GetReceiptResponse:
        """The user's one receipt, with its credit notes, once every event is handled."""
        await self.delivered(merchant_id)
        receipts = await self.receipts(merchant_id, user_id)
        assert len(receipts) == 1, [receipt.order_id for receipt in receipts]
        return await self.get_receipt(merchant_id, receipts[0].receipt_id)

    # --- events in flight -----------------------------------------------------------------------

    async def undelivered(self, merchant_id: str) -> dict[str, dict[str, str]]:
        """Per hop, the merchant's events written to the producer's outbox that the consumer
        has not handled yet. Hops are read upstream first: a consumer writes what it
        publishes in the transaction that records the event it handled, so a hop found
        complete has already written everything the next hop will be asked about."""
        missing: dict[str, dict[str, str]] = {}
        for hop in HOPS:
            sent = await self.service(hop.producer).outbox(merchant_id, hop.event_types)
            if not sent:
                continue
            handled = await self.service(hop.consumer).inbox(merchant_id) or set()
            pending = {event.event_id: event.event_type for event in sent if event.event_id not in handled}
            if pending:
                missing[f"{hop.producer} -> {hop.consumer}"] = pending
        return missing

    async def delivered(self, merchant_id: str, *, within: float = DELIVERY_SECONDS) -> None:
        """Waits until every event the merchant's calls caused has been handled downstream."""
        missing: dict[str, dict[str, str]] = {}

        async def none_missing() -> bool:
            missing.clear()
            missing.update(await self.undelivered(merchant_id))
            return not missing

        try:
            await eventually(none_missing, within=within)
        except AssertionError as late:
            raise AssertionError(
                f"events of {merchant_id} not handled within {within} s: {missing}"
            ) from late

    async def close(self) -> None:
        for service in (self.catalog, self.ledger, self.receipt, self.payment_gateway):
            await service.close()
