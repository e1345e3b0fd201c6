"""Test support, for the catalog's own tests and those of services and suites that run it (never
imported by the service itself). What the catalog's end-to-end tests share: a client of the
running service over gRPC, SQL probes of its merchant databases, a RabbitMQ queue capturing what
it publishes, and the tables of requests that drive the tests over every RPC of
`CatalogService`.

The tests see the service as a client does: generated stubs on a real channel, real JWTs,
statuses decoded from `grpc-status-details-bin`. SQL and the broker are only used to check
what a client cannot see (databases, rows, outbox, published messages). Routing keys and
error reasons are spelled out here as the API documents them, never imported from the
service, so that a renamed key or reason fails a test.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import grpc
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.catalog.v1 import catalog_service_pb2_grpc, events_pb2
from tally.catalog.v1 import resources_pb2 as res
from tally.common.v1.event_pb2 import EventEnvelope
from tally.common.v1.money_pb2 import Credits, Money
from tally_kit.auth import issue_dev_token
from tally_kit.db.directory import control_database_name, merchant_database_name, quote_identifier
from tally_kit.events import declare_events_exchange, unpack_payload
from tally_kit.events.topology import unrouted_exchange_name, unrouted_queue_name
from tally_kit.settings import ServiceSettings
from tally_kit.testing import unique_prefix

from tally_catalog.settings import CatalogSettings

SERVICE = api.DESCRIPTOR.services_by_name["CatalogService"]
SERVICE_NAME = SERVICE.full_name
RPC_NAMES: tuple[str, ...] = tuple(method.name for method in SERVICE.methods)
# AIP-155: a mutating RPC is one whose request carries an idempotency key.
MUTATING_RPCS: tuple[str, ...] = tuple(
    method.name for method in SERVICE.methods if "request_id" in method.input_type.fields_by_name
)
ERROR_DOMAIN = "catalog.tally"
PRODUCER = "catalog"
CALL_TIMEOUT_SECONDS = 10.0

# A well-formed merchant id that no test ever creates.
GHOST_MERCHANT = "ghost-merchant"


def new_id() -> str:
    """A fresh request id or correlation id (`x-request-id`)."""
    return str(uuid.uuid4())


def new_merchant_id(label: str) -> str:
    """A merchant id unique to this run, e.g. `rules-3fa9c1`."""
    return f"{label}-{secrets.token_hex(3)}"


def catalog_settings(**overrides: object) -> CatalogSettings:
    """Settings of a catalog of this run: unique database prefix and exchange, small pools."""
    prefix = unique_prefix()
    values: dict[str, object] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "db_prefix": prefix,
        "events_exchange": f"{prefix}catalog.e2e",
        # The PostgreSQL server is shared with other test runs.
        "db_max_pools": 6,
        "db_pool_max_size": 3,
        "db_max_connections": 8,
        "shutdown_grace_seconds": 5.0,
        **overrides,
    }
    return CatalogSettings(**values)  # type: ignore[arg-type]


def timestamp(value: datetime) -> Timestamp:
    message = Timestamp()
    message.FromDatetime(value)
    return message


def instant(value: Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


async def eventually(check: Callable[[], Awaitable[bool] | bool], *, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        assert asyncio.get_running_loop().time() < deadline, f"condition not met within {within} s"
        await asyncio.sleep(0.05)


class ServiceClock:
    """The in-process catalog's clock: real time plus an offset the tests only move forward.

    Moving it lets a test see a scheduled price or version take effect without waiting;
    every test reads `now` from it, so tests stay independent of each other's moves.
    """

    def __init__(self) -> None:
        self._offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def advance(self, delta: timedelta) -> None:
        if delta <= timedelta():
            raise ValueError("the service clock only moves forward")
        self._offset += delta


# --- statuses -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A failed call as a client decodes it: code, ErrorInfo and BadRequest field paths."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    fields: tuple[str, ...]


def refusal_of(error: grpc.aio.AioRpcError) -> Refusal:
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code().name} carries no google.rpc.Status: {error.details()}"
    infos: list[error_details_pb2.ErrorInfo] = []
    bad_requests: list[error_details_pb2.BadRequest] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            infos.append(error_details_pb2.ErrorInfo())
            detail.Unpack(infos[-1])
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_requests.append(error_details_pb2.BadRequest())
            detail.Unpack(bad_requests[-1])
    assert len(infos) == 1, f"expected one ErrorInfo, got {infos}"
    assert len(bad_requests) <= 1, f"expected at most one BadRequest, got {bad_requests}"
    fields = tuple(v.field for v in bad_requests[0].field_violations) if bad_requests else ()
    return Refusal(error.code(), error.details() or "", infos[0].reason, infos[0].domain, fields)


# --- SQL probes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxRow:
    event_id: str
    event_type: str
    correlation_id: str
    published: bool


@dataclass(frozen=True)
class Snapshot:
    """What a refused call must leave untouched."""

    # Every database of the run, and every merchant placement in the control database.
    databases: frozenset[str]
    placements: frozenset[tuple[str, str]]
    # Each table of one merchant database, as its sorted rows in text form (the outbox by
    # event id only: the relay marks rows published in the background).
    tables: Mapping[str, tuple[str, ...]]


class Databases:
    """Read-only probes of a catalog's databases, on short-lived connections of their own."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings

    @asynccontextmanager
    async def connect(self, database: str) -> AsyncIterator[asyncpg.Connection]:
        settings = self.settings
        conn = await asyncpg.connect(
            host=settings.pg_host,
            port=settings.pg_port,
            user=settings.pg_user,
            password=settings.pg_password.get_secret_value() or None,
            database=database,
        )
        try:
            yield conn
        finally:
            await conn.close()

    def merchant_database(self, merchant_id: str) -> str:
        return merchant_database_name(self.settings, merchant_id)

    async def fetch(self, merchant_id: str, query: str, *args: object) -> list[asyncpg.Record]:
        async with self.connect(self.merchant_database(merchant_id)) as conn:
            return await conn.fetch(query, *args)

    async def databases(self) -> frozenset[str]:
        """The names of every database of this run (they all carry its prefix)."""
        async with self.connect("postgres") as conn:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", self.settings.db_prefix
            )
        return frozenset(row["datname"] for row in rows)

    async def placements(self) -> frozenset[tuple[str, str]]:
        async with self.connect(control_database_name(self.settings)) as conn:
            rows = await conn.fetch("SELECT merchant_id, status FROM merchant_databases")
        return frozenset((row["merchant_id"], row["status"]) for row in rows)

    async def outbox(self, merchant_id: str) -> list[OutboxRow]:
        rows = await self.fetch(
            merchant_id, "SELECT event_id, event_type, envelope, published_at FROM outbox ORDER BY id"
        )
        return [
            OutboxRow(
                event_id=str(row["event_id"]),
                event_type=row["event_type"],
                correlation_id=EventEnvelope.FromString(row["envelope"]).correlation_id,
                published=row["published_at"] is not None,
            )
            for row in rows
        ]

    async def snapshot(self, merchant_id: str) -> Snapshot:
        tables: dict[str, tuple[str, ...]] = {}
        async with self.connect(self.merchant_database(merchant_id)) as conn:
            names = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            for name in sorted(row["tablename"] for row in names):
                # Identifiers cannot be bound; these come from the catalog, quoted.
                column = "t.event_id::text" if name == "outbox" else "t::text"
                rows = await conn.fetch(f"SELECT {column} AS row FROM {quote_identifier(name)} t ORDER BY 1")
                tables[name] = tuple(row["row"] for row in rows)
        return Snapshot(await self.databases(), await self.placements(), tables)


# --- the broker ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturedEvent:
    routing_key: str
    message_id: str
    # AMQP properties the relay sets from the envelope.
    correlation_id: str | None
    persistent: bool
    envelope: EventEnvelope
    payload: Message


class EventCapture:
    """A queue bound to an events exchange with `#`: every event the service publishes.

    It declares the exchange as the service's relay does (with its alternate exchange and
    the queue keeping unrouted events) and deletes all of it, and its own queue, on close.
    """

    def __init__(self, amqp_url: str, exchange: str) -> None:
        self._amqp_url = amqp_url
        self.exchange = exchange
        self.received: list[CapturedEvent] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None

    @property
    def queue_name(self) -> str:
        return f"{self.exchange}.capture"

    async def start(self) -> None:
        self._connection = await aio_pika.connect(self._amqp_url)
        self._channel = await self._connection.channel()
        exchange = await declare_events_exchange(self._channel, self.exchange)
        self._queue = await self._channel.declare_queue(self.queue_name, exclusive=True)
        await self._queue.bind(exchange, "#")
        self._consumer_tag = await self._queue.consume(self._on_message, no_ack=True)

    async def close(self) -> None:
        if self._connection is None:
            return
        try:
            if self._queue is not None and self._consumer_tag is not None:
                await self._queue.cancel(self._consumer_tag)
            if self._channel is not None:
                await self._channel.queue_delete(self.queue_name)
                await self._channel.exchange_delete(self.exchange)
                await self._channel.exchange_delete(unrouted_exchange_name(self.exchange))
                await self._channel.queue_delete(unrouted_queue_name(self.exchange))
        finally:
            await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        envelope = EventEnvelope.FromString(message.body)
        self.received.append(
            CapturedEvent(
                routing_key=message.routing_key or "",
                message_id=message.message_id or "",
                correlation_id=message.correlation_id,
                persistent=message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT,
                envelope=envelope,
                payload=unpack_payload(envelope),
            )
        )

    def event_ids(self) -> set[str]:
        return {event.envelope.event_id for event in self.received}

    def of_call(self, correlation_id: str) -> list[CapturedEvent]:
        return [event for event in self.received if event.envelope.correlation_id == correlation_id]


# --- requests -------------------------------------------------------------------------------------


def merchant_config(**changes: object) -> res.MerchantConfig:
    config = res.MerchantConfig(
        legal_name="Acme SAS",
        tax_id="FR40303265045",
        address=res.PostalAddress(address_lines=["1 rue de la Paix"], locality="Paris", region_code="FR"),
        receipt_series_prefix="ACME",
        tax_regime=res.TaxRegime(rate_percent="20", prices_include_tax=True),
        operation_timeout=Duration(seconds=900),
        retention_days=3650,
        default_currency="EUR",
    )
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def sellable_product(name: str = "Starter pack", credits: str = "100") -> res.Product:
    return res.Product(
        name=name, credits=Credits(value=credits), distribution=res.PRODUCT_DISTRIBUTION_SELLABLE
    )


def manual_grant_product(name: str = "Monthly credits") -> res.Product:
    return res.Product(
        name=name,
        credits=Credits(value="50"),
        distribution=res.PRODUCT_DISTRIBUTION_GRANT,
        grant_policy=res.GRANT_POLICY_MANUAL_GRANT,
    )


def subscription_plan(grant_product_id: str, name: str = "Pro") -> res.SubscriptionPlan:
    return res.SubscriptionPlan(
        name=name,
        price=Money(amount_minor=1999, currency="EUR"),
        billing_interval=res.BillingInterval(unit=res.BILLING_INTERVAL_UNIT_MONTH, count=1),
        recurring_grant_product_id=grant_product_id,
        dunning=res.DunningPolicy(final_action=res.DUNNING_FINAL_ACTION_CANCEL),
    )


@dataclass(frozen=True)
class Subjects:
    """A merchant and one resource of each kind in it, for requests that name them."""

    merchant_id: str
    product_id: str  # active, sellable, priced in EUR
    grant_product_id: str  # active MANUAL_GRANT
    plan_id: str
    operation_code: str  # one version, active


# --- the client -------------------------------------------------------------------------------------


@dataclass
class Catalog:
    """A running catalog seen from outside: its stub, its databases, its published events."""

    settings: ServiceSettings
    channel: grpc.aio.Channel
    databases: Databases
    events: EventCapture
    clock: ServiceClock | None = None
    stub: catalog_service_pb2_grpc.CatalogServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = catalog_service_pb2_grpc.CatalogServiceStub(self.channel)

    def token(self, role: str, merchant_id: str | None = None) -> str:
        return issue_dev_token(self.settings, role=role, merchant_id=merchant_id)

    def metadata(
        self,
        role: str | None = "platform",
        merchant_id: str | None = None,
        *,
        correlation_id: str | None = None,
        token: str | None = None,
    ) -> tuple[tuple[str, str], ...]:
        """Call metadata: a bearer token (none when `role` and `token` are None) and `x-request-id`."""
        if token is None and role is not None:
            token = self.token(role, merchant_id)
        metadata = [("x-request-id", correlation_id or new_id())]
        if token is not None:
            metadata.append(("authorization", f"Bearer {token}"))
        return tuple(metadata)

    async def call(
        self,
        rpc: str,
        request: Message,
        *,
        role: str | None = "platform",
        merchant_id: str | None = None,
        correlation_id: str | None = None,
        token: str | None = None,
    ) -> Any:
        """The response of `CatalogService/<rpc>` (typed by the RPC, hence Any)."""
        method = getattr(self.stub, rpc)
        metadata = self.metadata(role, merchant_id, correlation_id=correlation_id, token=token)
        return await method(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)

    async def refuse(
        self,
        rpc: str,
        request: Message,
        *,
        role: str | None = "platform",
        merchant_id: str | None = None,
        correlation_id: str | None = None,
        token: str | None = None,
    ) -> Refusal:
        """The refusal of a call expected to fail; a success fails the test."""
        try:
            response = await self.call(
                rpc, request, role=role, merchant_id=merchant_id, correlation_id=correlation_id, token=token
            )
        except grpc.aio.AioRpcError as error:
            return refusal_of(error)
        raise AssertionError(f"{rpc} succeeded instead of being refused: {response}")

    # Resources, created as the platform would.

    async def create_merchant(self, merchant_id: str) -> res.Merchant:
        request = api.CreateMerchantRequest(
            merchant_id=merchant_id, request_id=new_id(), config=merchant_config()
        )
        return (
            await self.stub.CreateMerchant(request, metadata=self.metadata(), timeout=CALL_TIMEOUT_SECONDS)
        ).merchant

    async def create_product(self, merchant_id: str, product: res.Product | None = None) -> res.Product:
        request = api.CreateProductRequest(
            merchant_id=merchant_id, request_id=new_id(), product=product or sellable_product()
        )
        return (
            await self.stub.CreateProduct(request, metadata=self.metadata(), timeout=CALL_TIMEOUT_SECONDS)
        ).product

    async def schedule_price(
        self,
        merchant_id: str,
        product_id: str,
        amount_minor: int,
        *,
        currency: str = "EUR",
        effective: datetime | None = None,
    ) -> api.ScheduleProductPriceResponse:
        request = api.ScheduleProductPriceRequest(
            merchant_id=merchant_id,
            product_id=product_id,
            request_id=new_id(),
            price=Money(amount_minor=amount_minor, currency=currency),
        )
        if effective is not None:
            request.effective_time.CopyFrom(timestamp(effective))
        return await self.stub.ScheduleProductPrice(
            request, metadata=self.metadata(), timeout=CALL_TIMEOUT_SECONDS
        )

    async def schedule_operation_type(
        self, merchant_id: str, operation_code: str, rate: str, *, effective: datetime | None = None
    ) -> api.ScheduleOperationTypeVersionResponse:
        request = api.ScheduleOperationTypeVersionRequest(
            merchant_id=merchant_id,
            operation_code=operation_code,
            request_id=new_id(),
            resource_unit="token",
            credits_per_unit=Credits(value=rate),
        )
        if effective is not None:
            request.effective_time.CopyFrom(timestamp(effective))
        return await self.stub.ScheduleOperationTypeVersion(
            request, metadata=self.metadata(), timeout=CALL_TIMEOUT_SECONDS
        )

    async def seed(self, merchant_id: str) -> Subjects:
        """Create the merchant with a priced product, a grant, a plan and an operation type."""
        await self.create_merchant(merchant_id)
        product = await self.create_product(merchant_id)
        await self.schedule_price(merchant_id, product.product_id, 990)
        grant = await self.create_product(merchant_id, manual_grant_product())
        plan = await self.stub.CreateSubscriptionPlan(
            api.CreateSubscriptionPlanRequest(
                merchant_id=merchant_id,
                request_id=new_id(),
                subscription_plan=subscription_plan(grant.product_id),
            ),
            metadata=self.metadata(),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        await self.schedule_operation_type(merchant_id, "api.calls", "0.5")
        return Subjects(
            merchant_id=merchant_id,
            product_id=product.product_id,
            grant_product_id=grant.product_id,
            plan_id=plan.subscription_plan.plan_id,
            operation_code="api.calls",
        )

    async def published_events(self, merchant_id: str, correlation_id: str) -> list[CapturedEvent]:
        """Every event delivered for one call, once the merchant's outbox is fully published.

        A published row has the broker's confirm, so the capture queue holds it: this waits
        for every row of the merchant to be published and every row of the call to be captured.
        """

        async def settled() -> bool:
            rows = await self.databases.outbox(merchant_id)
            if not all(row.published for row in rows):
                return False
            of_call = {row.event_id for row in rows if row.correlation_id == correlation_id}
            return of_call <= self.events.event_ids()

        await eventually(settled)
        return self.events.of_call(correlation_id)


# --- every RPC: a valid request, and how to break it ----------------------------------------------


def valid_request(rpc: str, s: Subjects) -> Message:
    """A request of `rpc` that succeeds for the platform (CreateMerchant names a new merchant)."""
    m = s.merchant_id
    requests: dict[str, Callable[[], Message]] = {
        "CreateMerchant": lambda: api.CreateMerchantRequest(
            merchant_id=new_merchant_id("new"), request_id=new_id(), config=merchant_config()
        ),
        "GetMerchant": lambda: api.GetMerchantRequest(merchant_id=m),
        "UpdateMerchantConfig": lambda: api.UpdateMerchantConfigRequest(
            merchant_id=m,
            request_id=new_id(),
            config=res.MerchantConfig(retention_days=30),
            update_mask=FieldMask(paths=["retention_days"]),
        ),
        "CreateProduct": lambda: api.CreateProductRequest(
            merchant_id=m, request_id=new_id(), product=sellable_product()
        ),
        "GetProduct": lambda: api.GetProductRequest(merchant_id=m, product_id=s.product_id),
        "ListProducts": lambda: api.ListProductsRequest(merchant_id=m),
        "ArchiveProduct": lambda: api.ArchiveProductRequest(
            merchant_id=m, product_id=s.product_id, request_id=new_id()
        ),
        "ScheduleProductPrice": lambda: api.ScheduleProductPriceRequest(
            merchant_id=m,
            product_id=s.product_id,
            request_id=new_id(),
            price=Money(amount_minor=1290, currency="EUR"),
        ),
        "ListProductPrices": lambda: api.ListProductPricesRequest(merchant_id=m, product_id=s.product_id),
        "GetOffer": lambda: api.GetOfferRequest(merchant_id=m, product_id=s.product_id),
        "ListOffers": lambda: api.ListOffersRequest(merchant_id=m),
        "ScheduleOperationTypeVersion": lambda: api.ScheduleOperationTypeVersionRequest(
            merchant_id=m,
            operation_code=s.operation_code,
            request_id=new_id(),
            resource_unit="token",
            credits_per_unit=Credits(value="0.75"),
        ),
        "GetOperationTypeVersion": lambda: api.GetOperationTypeVersionRequest(
            merchant_id=m, operation_code=s.operation_code, version=1
        ),
        "GetActiveOperationTypeVersion": lambda: api.GetActiveOperationTypeVersionRequest(
            merchant_id=m, operation_code=s.operation_code
        ),
        "ListOperationTypeVersions": lambda: api.ListOperationTypeVersionsRequest(
            merchant_id=m, operation_code=s.operation_code
        ),
        "CreateSubscriptionPlan": lambda: api.CreateSubscriptionPlanRequest(
            merchant_id=m, request_id=new_id(), subscription_plan=subscription_plan(s.grant_product_id)
        ),
        "GetSubscriptionPlan": lambda: api.GetSubscriptionPlanRequest(merchant_id=m, plan_id=s.plan_id),
        "ListSubscriptionPlans": lambda: api.ListSubscriptionPlansRequest(merchant_id=m),
    }
    return requests[rpc]()


Breakage = Callable[[Any], None]


@dataclass(frozen=True)
class BadField:
    """One field broken in a valid request, and the field path the refusal must name."""

    field: str
    breaks: Breakage


@dataclass(frozen=True)
class UnknownTarget:
    """A valid request pointed at something that does not exist, and the NOT_FOUND reason."""

    what: str
    reason: str
    points_elsewhere: Breakage


@dataclass(frozen=True)
class RefusalCases:
    missing: BadField
    malformed: BadField
    # Every kind of thing the request names that may not exist; empty only with a reason.
    unknown: tuple[UnknownTarget, ...]
    no_unknown_because: str = ""


def _set(path: str, value: object) -> Breakage:
    """Set a (dotted) field of the request, e.g. `_set("product.credits.value", "1.5")`."""
    *parents, name = path.split(".")

    def breaks(request: Any) -> None:
        target = request
        for parent in parents:
            target = getattr(target, parent)
        if isinstance(value, list):
            # Repeated fields are changed in place; protobuf refuses assigning them.
            repeated = getattr(target, name)
            del repeated[:]
            repeated.extend(value)
        else:
            setattr(target, name, value)

    return breaks


def _clear(path: str) -> Breakage:
    *parents, name = path.split(".")

    def breaks(request: Any) -> None:
        target = request
        for parent in parents:
            target = getattr(target, parent)
        target.ClearField(name)

    return breaks


def _far_future_read_time(request: Any) -> None:
    # Beyond year 9999: a Timestamp no service can represent.
    request.read_time.seconds = 10**12


UNKNOWN_ID = "0b6f3c1e-8f0a-4c5e-9a51-2f4f1c9e7d10"
UNKNOWN_MERCHANT = UnknownTarget("merchant", "MERCHANT_NOT_FOUND", _set("merchant_id", GHOST_MERCHANT))
UNKNOWN_PRODUCT = UnknownTarget("product", "PRODUCT_NOT_FOUND", _set("product_id", UNKNOWN_ID))

REFUSALS: dict[str, RefusalCases] = {
    "CreateMerchant": RefusalCases(
        missing=BadField("config", _clear("config")),
        malformed=BadField("merchant_id", _set("merchant_id", "Acme_Corp")),
        unknown=(),
        no_unknown_because="it names a merchant that does not exist yet",
    ),
    "GetMerchant": RefusalCases(
        missing=BadField("merchant_id", _set("merchant_id", "")),
        malformed=BadField("merchant_id", _set("merchant_id", "ACME")),
        unknown=(UNKNOWN_MERCHANT,),
    ),
    "UpdateMerchantConfig": RefusalCases(
        missing=BadField("request_id", _set("request_id", "")),
        malformed=BadField("update_mask", _set("update_mask.paths", ["colour"])),
        unknown=(UNKNOWN_MERCHANT,),
    ),
    "CreateProduct": RefusalCases(
        missing=BadField("product.credits", _clear("product.credits")),
        malformed=BadField("product.credits.value", _set("product.credits.value", "1.0000001")),
        unknown=(UNKNOWN_MERCHANT,),
    ),
    "GetProduct": RefusalCases(
        missing=BadField("product_id", _set("product_id", "")),
        malformed=BadField("product_id", _set("product_id", "not-a-uuid")),
        unknown=(UNKNOWN_MERCHANT, UNKNOWN_PRODUCT),
    ),
    "ListProducts": RefusalCases(
        missing=BadField("merchant_id", _set("merchant_id", "")),
        malformed=BadField("page_size", _set("page_size", -1)),
        unknown=(UNKNOWN_MERCHANT,),
    ),
    "ArchiveProduct": RefusalCases(
        missing=BadField("request_id", _set("request_id", "")),
        malformed=BadField("product_id", _set("product_id", "42")),
        unknown=(UNKNOWN_MERCHANT, UNKNOWN_PRODUCT),
    ),
    "ScheduleProductPrice": RefusalCases(
        missing=BadField("price", _clear("price")),
        malformed=BadField("price.currency", _set("price.currency", "euro")),
        unknown=(UNKNOWN_MERCHANT, UNKNOWN_PRODUCT),
    ),
    "ListProductPrices": RefusalCases(
        missing=BadField("product_id", _set("product_id", "")),
        malformed=BadField("page_token", _set("page_token", "not-a-page-token")),
        unknown=(UNKNOWN_MERCHANT, UNKNOWN_PRODUCT),
    ),
    "GetOffer": RefusalCases(
        missing=BadField("product_id", _set("product_id", "")),
        malformed=BadField("currency", _set("currency", "Euro")),
        unknown=(UNKNOWN_MERCHANT, UNKNOWN_PRODUCT),
    ),
    "ListOffers": RefusalCases(
        missing=BadField("merchant_id", _set("merchant_id", "")),
        malformed=BadField("currency", _set("currency", "E")),
        unknown=(UNKNOWN_MERCHANT,),
    ),
    "ScheduleOperationTypeVersion": RefusalCases(
        missing=BadField("credits_per_unit", _clear("credits_per_unit")),
        malformed=BadField("operation_code", _set("operation_code", "LLM Tokens")),
        unknown=(UNKNOWN_MERCHANT,),
    ),
    "GetOperationTypeVersion": RefusalCases(
        missing=BadField("operation_code", _set("operation_code", "")),
        malformed=BadField("version", _set("version", -1)),
        unknown=(
            UNKNOWN_MERCHANT,
            UnknownTarget("version", "OPERATION_TYPE_VERSION_NOT_FOUND", _set("version", 99)),
        ),
    ),
    "GetActiveOperationTypeVersion": RefusalCases(
        missing=BadField("operation_code", _set("operation_code", "")),
        malformed=BadField("read_time", _far_future_read_time),
        unknown=(
            UNKNOWN_MERCHANT,
            UnknownTarget(
                "operation type", "OPERATION_TYPE_NOT_FOUND", _set("operation_code", "never.scheduled")
            ),
        ),
    ),
    "ListOperationTypeVersions": RefusalCases(
        missing=BadField("operation_code", _set("operation_code", "")),
        malformed=BadField("page_size", _set("page_size", -3)),
        unknown=(UNKNOWN_MERCHANT,),
    ),
    "CreateSubscriptionPlan": RefusalCases(
        missing=BadField("subscription_plan.price", _clear("subscription_plan.price")),
        malformed=BadField(
            "subscription_plan.billing_interval.count", _set("subscription_plan.billing_interval.count", 0)
        ),
        unknown=(
            UNKNOWN_MERCHANT,
            UnknownTarget(
                "recurring grant product",
                "PRODUCT_NOT_FOUND",
                _set("subscription_plan.recurring_grant_product_id", UNKNOWN_ID),
            ),
        ),
    ),
    "GetSubscriptionPlan": RefusalCases(
        missing=BadField("plan_id", _set("plan_id", "")),
        malformed=BadField("plan_id", _set("plan_id", "plan-1")),
        unknown=(
            UNKNOWN_MERCHANT,
            UnknownTarget("plan", "SUBSCRIPTION_PLAN_NOT_FOUND", _set("plan_id", UNKNOWN_ID)),
        ),
    ),
    "ListSubscriptionPlans": RefusalCases(
        missing=BadField("merchant_id", _set("merchant_id", "")),
        malformed=BadField("page_token", _set("page_token", "bm90LWEtdG9rZW4")),
        unknown=(UNKNOWN_MERCHANT,),
    ),
}


def broken(request: Message, breakage: Breakage) -> Message:
    copy = type(request)()
    copy.CopyFrom(request)
    breakage(copy)
    return copy


# --- every mutating RPC: a fresh change, its event, and a refusal -------------------------------------


Prepare = Callable[[Catalog, str], Awaitable[Message]]


@dataclass(frozen=True)
class Mutation:
    rpc: str
    # The routing key its event is published under, as events.proto documents it.
    event_type: str
    # A request that succeeds on the merchant, with whatever it needs created first.
    prepare: Prepare
    # The same request with another payload (its request_id kept).
    another_payload: Breakage
    # The event payload the response announces.
    expected_event: Callable[[Any], Message]
    # A request the service refuses, and why: inside the merchant transaction, after the
    # idempotency key was reserved, where the RPC has such a refusal (the others refuse an
    # unknown merchant before any transaction).
    prepare_refused: Prepare
    refused_code: grpc.StatusCode
    refused_reason: str


async def _new_merchant_request(catalog: Catalog, merchant_id: str) -> Message:
    return api.CreateMerchantRequest(
        merchant_id=new_merchant_id("made"), request_id=new_id(), config=merchant_config()
    )


async def _existing_merchant_request(catalog: Catalog, merchant_id: str) -> Message:
    return api.CreateMerchantRequest(merchant_id=merchant_id, request_id=new_id(), config=merchant_config())


async def _config_update(catalog: Catalog, merchant_id: str) -> Message:
    return api.UpdateMerchantConfigRequest(
        merchant_id=merchant_id,
        request_id=new_id(),
        config=res.MerchantConfig(legal_name=f"Acme {secrets.token_hex(4)}"),
        update_mask=FieldMask(paths=["legal_name"]),
    )


async def _config_update_of_unknown_merchant(catalog: Catalog, merchant_id: str) -> Message:
    request = await _config_update(catalog, merchant_id)
    assert isinstance(request, api.UpdateMerchantConfigRequest)
    request.merchant_id = GHOST_MERCHANT
    return request


async def _product_creation(catalog: Catalog, merchant_id: str) -> Message:
    return api.CreateProductRequest(
        merchant_id=merchant_id,
        request_id=new_id(),
        product=sellable_product(name=f"Pack {secrets.token_hex(4)}"),
    )


async def _product_creation_for_unknown_merchant(catalog: Catalog, merchant_id: str) -> Message:
    request = await _product_creation(catalog, merchant_id)
    assert isinstance(request, api.CreateProductRequest)
    request.merchant_id = GHOST_MERCHANT
    return request


async def _product_archiving(catalog: Catalog, merchant_id: str) -> Message:
    product = await catalog.create_product(merchant_id)
    return api.ArchiveProductRequest(
        merchant_id=merchant_id, product_id=product.product_id, request_id=new_id()
    )


async def _second_archiving(catalog: Catalog, merchant_id: str) -> Message:
    first = await _product_archiving(catalog, merchant_id)
    await catalog.call("ArchiveProduct", first)
    return api.ArchiveProductRequest(
        merchant_id=merchant_id,
        product_id=first.product_id,  # type: ignore[attr-defined]
        request_id=new_id(),
    )


async def _price_change(catalog: Catalog, merchant_id: str) -> Message:
    """A second price, a day ahead, so that the change supersedes the first."""
    product = await catalog.create_product(merchant_id)
    await catalog.schedule_price(merchant_id, product.product_id, 990)
    assert catalog.clock is not None
    request = api.ScheduleProductPriceRequest(
        merchant_id=merchant_id,
        product_id=product.product_id,
        request_id=new_id(),
        price=Money(amount_minor=1290, currency="EUR"),
    )
    request.effective_time.CopyFrom(timestamp(catalog.clock() + timedelta(days=1)))
    return request


async def _overlapping_price(catalog: Catalog, merchant_id: str) -> Message:
    request = await _price_change(catalog, merchant_id)
    assert isinstance(request, api.ScheduleProductPriceRequest)
    await catalog.call("ScheduleProductPrice", request)
    request.request_id = new_id()
    request.price.amount_minor = 1390
    return request


async def _operation_type_change(catalog: Catalog, merchant_id: str) -> Message:
    """A second version, a day ahead, so that the change ends the first."""
    code = f"op.{secrets.token_hex(4)}"
    await catalog.schedule_operation_type(merchant_id, code, "0.5")
    assert catalog.clock is not None
    request = api.ScheduleOperationTypeVersionRequest(
        merchant_id=merchant_id,
        operation_code=code,
        request_id=new_id(),
        resource_unit="token",
        credits_per_unit=Credits(value="0.25"),
    )
    request.effective_time.CopyFrom(timestamp(catalog.clock() + timedelta(days=1)))
    return request


async def _overlapping_operation_type(catalog: Catalog, merchant_id: str) -> Message:
    request = await _operation_type_change(catalog, merchant_id)
    assert isinstance(request, api.ScheduleOperationTypeVersionRequest)
    await catalog.call("ScheduleOperationTypeVersion", request)
    request.request_id = new_id()
    request.credits_per_unit.value = "0.2"
    return request


async def _plan_creation(catalog: Catalog, merchant_id: str) -> Message:
    grant = await catalog.create_product(merchant_id, manual_grant_product())
    return api.CreateSubscriptionPlanRequest(
        merchant_id=merchant_id, request_id=new_id(), subscription_plan=subscription_plan(grant.product_id)
    )


async def _plan_granting_a_sellable_product(catalog: Catalog, merchant_id: str) -> Message:
    sellable = await catalog.create_product(merchant_id)
    return api.CreateSubscriptionPlanRequest(
        merchant_id=merchant_id, request_id=new_id(), subscription_plan=subscription_plan(sellable.product_id)
    )


MUTATIONS: dict[str, Mutation] = {
    "CreateMerchant": Mutation(
        rpc="CreateMerchant",
        event_type="catalog.merchant_created",
        prepare=_new_merchant_request,
        another_payload=_set("config.legal_name", "Another SAS"),
        expected_event=lambda response: events_pb2.MerchantCreated(merchant=response.merchant),
        prepare_refused=_existing_merchant_request,
        refused_code=grpc.StatusCode.ALREADY_EXISTS,
        refused_reason="MERCHANT_ALREADY_EXISTS",
    ),
    "UpdateMerchantConfig": Mutation(
        rpc="UpdateMerchantConfig",
        event_type="catalog.merchant_config_updated",
        prepare=_config_update,
        another_payload=_set("config.legal_name", "Another SAS"),
        expected_event=lambda response: events_pb2.MerchantConfigUpdated(merchant=response.merchant),
        prepare_refused=_config_update_of_unknown_merchant,
        refused_code=grpc.StatusCode.NOT_FOUND,
        refused_reason="MERCHANT_NOT_FOUND",
    ),
    "CreateProduct": Mutation(
        rpc="CreateProduct",
        event_type="catalog.product_created",
        prepare=_product_creation,
        another_payload=_set("product.name", "Another pack"),
        expected_event=lambda response: events_pb2.ProductCreated(product=response.product),
        prepare_refused=_product_creation_for_unknown_merchant,
        refused_code=grpc.StatusCode.NOT_FOUND,
        refused_reason="MERCHANT_NOT_FOUND",
    ),
    "ArchiveProduct": Mutation(
        rpc="ArchiveProduct",
        event_type="catalog.product_archived",
        prepare=_product_archiving,
        another_payload=_set("product_id", UNKNOWN_ID),
        expected_event=lambda response: events_pb2.ProductArchived(product=response.product),
        prepare_refused=_second_archiving,
        refused_code=grpc.StatusCode.FAILED_PRECONDITION,
        refused_reason="PRODUCT_ARCHIVED",
    ),
    "ScheduleProductPrice": Mutation(
        rpc="ScheduleProductPrice",
        event_type="catalog.product_price_scheduled",
        prepare=_price_change,
        another_payload=_set("price.amount_minor", 1291),
        expected_event=lambda response: events_pb2.ProductPriceScheduled(
            price=response.price, previous_price=response.previous_price
        ),
        prepare_refused=_overlapping_price,
        refused_code=grpc.StatusCode.FAILED_PRECONDITION,
        refused_reason="PRICE_VERSION_OVERLAP",
    ),
    "ScheduleOperationTypeVersion": Mutation(
        rpc="ScheduleOperationTypeVersion",
        event_type="catalog.operation_type_version_scheduled",
        prepare=_operation_type_change,
        another_payload=_set("credits_per_unit.value", "0.3"),
        expected_event=lambda response: events_pb2.OperationTypeVersionScheduled(
            operation_type_version=response.operation_type_version,
            previous_version=response.previous_version,
        ),
        prepare_refused=_overlapping_operation_type,
        refused_code=grpc.StatusCode.FAILED_PRECONDITION,
        refused_reason="OPERATION_TYPE_VERSION_OVERLAP",
    ),
    "CreateSubscriptionPlan": Mutation(
        rpc="CreateSubscriptionPlan",
        event_type="catalog.subscription_plan_created",
        prepare=_plan_creation,
        another_payload=_set("subscription_plan.trial_days", 14),
        expected_event=lambda response: events_pb2.SubscriptionPlanCreated(
            subscription_plan=response.subscription_plan
        ),
        prepare_refused=_plan_granting_a_sellable_product,
        refused_code=grpc.StatusCode.FAILED_PRECONDITION,
        refused_reason="PRODUCT_NOT_MANUAL_GRANT",
    ),
}
