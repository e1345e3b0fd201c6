"""What the servicer tests share: an in-memory catalog (the port to another service, not a
database), a clock the tests move, a relay that records notifications, a terse client of the
servicer, and SQL probes of a merchant's ledger database (its tables, its outbox, and the
books' invariants)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tally.common.v1.event_pb2 import EventEnvelope
from tally.common.v1.money_pb2 import Credits, Money
from tally.ledger.v1 import ledger_service_pb2 as api
from tally.ledger.v1 import resources_pb2 as res
from tally_kit.db.directory import MerchantDirectory, quote_identifier
from tally_kit.errors import FailedPrecondition, NotFound, TallyError
from tally_ledger import events
from tally_ledger.catalog import Distribution, GrantPolicy, MerchantTerms, ProductTemplate
from tally_ledger.domain import OperationRate
from tally_ledger.servicer import LedgerServicer

T0 = datetime(2030, 1, 1, tzinfo=UTC)
PRODUCER = "ledger"
OPERATION_CODE = "llm.tokens"


def new_id() -> str:
    return str(uuid.uuid4())


def new_user(label: str = "user") -> str:
    return f"{label}-{secrets.token_hex(4)}"


def timestamp(value: datetime) -> Timestamp:
    message = Timestamp()
    message.FromDatetime(value)
    return message


def instant(value: Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


class Clock:
    """The service's clock: tests only move it forward, so every test may read it."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        if delta <= timedelta():
            raise ValueError("the clock only moves forward")
        self.now += delta
        return self.now


class RecordingRelay:
    def __init__(self) -> None:
        self.notified: list[str] = []

    def notify(self, merchant_id: str) -> None:
        self.notified.append(merchant_id)


class MemoryCatalog:
    """A `CatalogReader` over dictionaries: what the catalog would answer."""

    def __init__(self) -> None:
        self.terms: dict[str, MerchantTerms] = {}
        self.products: dict[str, dict[uuid.UUID, ProductTemplate]] = {}
        # Versions of each operation code by start.
        self.rates: dict[tuple[str, str], list[tuple[datetime, OperationRate]]] = {}
        self.product_reads = 0

    def add_merchant(self, merchant_id: str, operation_timeout: timedelta = timedelta(minutes=15)) -> None:
        self.terms[merchant_id] = MerchantTerms(operation_timeout=operation_timeout)
        self.products[merchant_id] = {}

    def add_product(
        self,
        merchant_id: str,
        credits: str,
        *,
        days: int | None = None,
        distribution: Distribution = Distribution.SELLABLE,
        policy: GrantPolicy | None = None,
        archived: bool = False,
        name: str = "Pack",
    ) -> ProductTemplate:
        product = ProductTemplate(
            product_id=uuid.uuid4(),
            name=name,
            credits=Decimal(credits),
            access_period_days=days,
            distribution=distribution,
            grant_policy=policy,
            archived=archived,
        )
        self.products[merchant_id][product.product_id] = product
        return product

    def schedule_rate(self, merchant_id: str, code: str, rate: str, starts_at: datetime) -> OperationRate:
        versions = self.rates.setdefault((merchant_id, code), [])
        version = OperationRate(code, len(versions) + 1, "token", Decimal(rate))
        versions.append((starts_at, version))
        return version

    def _merchant(self, merchant_id: str) -> dict[uuid.UUID, ProductTemplate]:
        if merchant_id not in self.terms:
            raise NotFound(f"merchant {merchant_id} does not exist", reason="MERCHANT_NOT_FOUND")
        return self.products[merchant_id]

    async def product(self, merchant_id: str, product_id: uuid.UUID) -> ProductTemplate:
        self.product_reads += 1
        product = self._merchant(merchant_id).get(product_id)
        if product is None:
            raise NotFound(f"product {product_id} does not exist", reason="PRODUCT_NOT_FOUND")
        return product

    async def signup_products(self, merchant_id: str) -> list[ProductTemplate]:
        return [
            p
            for p in self._merchant(merchant_id).values()
            if p.grant_policy is GrantPolicy.APPLY_ON_SIGNUP and not p.archived
        ]

    async def operation_rate(self, merchant_id: str, operation_code: str, at: datetime) -> OperationRate:
        self._merchant(merchant_id)
        versions = self.rates.get((merchant_id, operation_code))
        if not versions:
            raise NotFound(
                f"operation type {operation_code} does not exist", reason="OPERATION_TYPE_NOT_FOUND"
            )
        active = [rate for starts_at, rate in versions if starts_at <= at]
        if not active:
            raise FailedPrecondition(
                f"operation type {operation_code} has no version in effect",
                reason="OPERATION_TYPE_NOT_ACTIVE",
            )
        return active[-1]

    async def merchant_terms(self, merchant_id: str) -> MerchantTerms:
        self._merchant(merchant_id)
        return self.terms[merchant_id]


async def refusal(call: Awaitable[Any]) -> TallyError:
    with pytest.raises(TallyError) as refused:
        await call
    return refused.value


def credits(value: Credits) -> Decimal:
    return Decimal(value.value)


@dataclass
class Client:
    """The servicer as a test calls it, for one merchant."""

    servicer: LedgerServicer
    merchant_id: str
    clock: Clock

    async def register(self, user_id: str) -> api.RegisterUserResponse:
        return await self.servicer.RegisterUser(
            api.RegisterUserRequest(merchant_id=self.merchant_id, request_id=new_id(), user_id=user_id), None
        )

    def settle_request(
        self, user_id: str, product_id: uuid.UUID, *, order_id: str | None = None, paid: int = 990
    ) -> api.SettlePurchaseRequest:
        return api.SettlePurchaseRequest(
            merchant_id=self.merchant_id,
            request_id=new_id(),
            order_id=order_id or f"order-{secrets.token_hex(4)}",
            user_id=user_id,
            product_id=str(product_id),
            amount_paid=Money(amount_minor=paid, currency="EUR"),
            provider_reference=f"psp-{secrets.token_hex(4)}",
        )

    async def settle(self, user_id: str, product_id: uuid.UUID, **options: Any) -> api.SettlePurchaseResponse:
        return await self.servicer.SettlePurchase(self.settle_request(user_id, product_id, **options), None)

    def grant_request(
        self,
        user_id: str,
        amount: str,
        *,
        expires_at: datetime | None = None,
        source: res.LotSource.ValueType = res.LOT_SOURCE_PROMOTION,
        grant_key: str | None = None,
    ) -> api.GrantCreditsRequest:
        custom = api.CustomGrant(credits=Credits(value=amount))
        if expires_at is not None:
            custom.expire_time.CopyFrom(timestamp(expires_at))
        return api.GrantCreditsRequest(
            merchant_id=self.merchant_id,
            request_id=new_id(),
            user_id=user_id,
            grant_key=grant_key or f"promo-{secrets.token_hex(4)}",
            custom=custom,
            source=source,
        )

    async def grant(self, user_id: str, amount: str, **options: Any) -> api.GrantCreditsResponse:
        return await self.servicer.GrantCredits(self.grant_request(user_id, amount, **options), None)

    def open_request(
        self, user_id: str, *, code: str = OPERATION_CODE, workflow_id: str = ""
    ) -> api.OpenOperationRequest:
        return api.OpenOperationRequest(
            merchant_id=self.merchant_id,
            request_id=new_id(),
            user_id=user_id,
            operation_code=code,
            workflow_id=workflow_id,
        )

    async def open(self, user_id: str, **options: Any) -> res.Operation:
        response = await self.servicer.OpenOperation(self.open_request(user_id, **options), None)
        return response.operation

    def close_request(self, operation_id: str, resource: str) -> api.RecordAndCloseOperationRequest:
        return api.RecordAndCloseOperationRequest(
            merchant_id=self.merchant_id,
            request_id=new_id(),
            operation_id=operation_id,
            resource_amount=resource,
        )

    async def close(self, operation_id: str, resource: str) -> api.RecordAndCloseOperationResponse:
        return await self.servicer.RecordAndCloseOperation(self.close_request(operation_id, resource), None)

    def cancel_request(self, operation_id: str) -> api.CancelOperationRequest:
        return api.CancelOperationRequest(
            merchant_id=self.merchant_id, request_id=new_id(), operation_id=operation_id
        )

    async def consume(
        self, user_id: str, resource: str, **options: Any
    ) -> api.RecordAndCloseOperationResponse:
        operation = await self.open(user_id, **options)
        return await self.close(operation.operation_id, resource)

    def refund_request(
        self, order_id: str, amount: int, *, reference: str | None = None, reason: str = ""
    ) -> api.ApplyRefundRequest:
        return api.ApplyRefundRequest(
            merchant_id=self.merchant_id,
            request_id=new_id(),
            order_id=order_id,
            refund_reference=reference or f"re-{secrets.token_hex(4)}",
            amount_refunded=Money(amount_minor=amount, currency="EUR"),
            reason=reason,
        )

    async def refund(self, order_id: str, amount: int, **options: Any) -> api.ApplyRefundResponse:
        return await self.servicer.ApplyRefund(self.refund_request(order_id, amount, **options), None)

    def chargeback_request(
        self, order_id: str, amount: int, *, reference: str | None = None
    ) -> api.ApplyChargebackRequest:
        return api.ApplyChargebackRequest(
            merchant_id=self.merchant_id,
            request_id=new_id(),
            order_id=order_id,
            chargeback_reference=reference or f"dp-{secrets.token_hex(4)}",
            amount=Money(amount_minor=amount, currency="EUR"),
        )

    async def chargeback(self, order_id: str, amount: int, **options: Any) -> api.ApplyChargebackResponse:
        return await self.servicer.ApplyChargeback(self.chargeback_request(order_id, amount, **options), None)

    def adjust_request(self, user_id: str, amount: str) -> api.ApplyAdjustmentRequest:
        return api.ApplyAdjustmentRequest(
            merchant_id=self.merchant_id,
            request_id=new_id(),
            user_id=user_id,
            amount=Credits(value=amount),
            reason="goodwill",
            actor="admin@acme.example",
        )

    async def adjust(self, user_id: str, amount: str) -> api.ApplyAdjustmentResponse:
        return await self.servicer.ApplyAdjustment(self.adjust_request(user_id, amount), None)

    async def balance(self, user_id: str, read_at: datetime | None = None) -> res.Balance:
        request = api.GetBalanceRequest(merchant_id=self.merchant_id, user_id=user_id)
        if read_at is not None:
            request.read_time.CopyFrom(timestamp(read_at))
        return (await self.servicer.GetBalance(request, None)).balance

    async def lots(self, user_id: str, *states: res.LotState.ValueType, page_size: int = 0) -> list[res.Lot]:
        request = api.ListLotsRequest(
            merchant_id=self.merchant_id, user_id=user_id, states=list(states), page_size=page_size
        )
        lots: list[res.Lot] = []
        while True:
            page = await self.servicer.ListLots(request, None)
            lots.extend(page.lots)
            if not page.next_page_token:
                return lots
            request.page_token = page.next_page_token

    async def history(self, user_id: str, **filters: Any) -> list[res.LedgerEntry]:
        request = api.GetLedgerHistoryRequest(merchant_id=self.merchant_id, user_id=user_id, **filters)
        entries: list[res.LedgerEntry] = []
        while True:
            page = await self.servicer.GetLedgerHistory(request, None)
            entries.extend(page.entries)
            if not page.next_page_token:
                return entries
            request.page_token = page.next_page_token


# --- SQL probes -------------------------------------------------------------------------------


async def published(directory: MerchantDirectory, merchant_id: str, event_type: str) -> list[Any]:
    """The payloads of the merchant's outbox rows of one event type, in the order written."""
    async with directory.connection(merchant_id) as conn:
        rows = await conn.fetch("SELECT envelope FROM outbox WHERE event_type = $1 ORDER BY id", event_type)
    payloads = []
    for row in rows:
        envelope = EventEnvelope.FromString(row["envelope"])
        assert envelope.merchant_id == merchant_id and envelope.producer == PRODUCER
        payload = events.PAYLOAD_TYPES[event_type]()
        assert envelope.payload.Unpack(payload)
        payloads.append(payload)
    return payloads


async def snapshot(directory: MerchantDirectory, merchant_id: str) -> dict[str, tuple[str, ...]]:
    """Every table of the merchant's ledger database as its sorted rows in text form."""
    tables: dict[str, tuple[str, ...]] = {}
    async with directory.connection(merchant_id) as conn:
        names = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        for name in sorted(row["tablename"] for row in names):
            # Identifiers cannot be bound; these come from the database's own catalog, quoted.
            rows = await conn.fetch(f"SELECT t::text AS row FROM {quote_identifier(name)} t ORDER BY 1")
            tables[name] = tuple(row["row"] for row in rows)
    return tables


async def books_disagreements(directory: MerchantDirectory, merchant_id: str) -> list[str]:
    """Every account whose kept balance or debt, and every lot whose kept remaining credits,
    differ from the sum of their entries (empty when the books are right)."""
    async with directory.connection(merchant_id) as conn:
        accounts = await conn.fetch(
            """
            SELECT a.user_id, a.balance, a.debt,
                   coalesce(sum(e.amount), 0) AS entries,
                   coalesce(-sum(e.amount) FILTER (WHERE e.lot_id IS NULL), 0) AS owed
              FROM accounts a
              LEFT JOIN entries e ON e.merchant_id = a.merchant_id AND e.user_id = a.user_id
             GROUP BY a.user_id, a.balance, a.debt
            """
        )
        lots = await conn.fetch(
            """
            SELECT l.lot_id, l.remaining, coalesce(sum(e.amount), 0) AS entries
              FROM lots l
              LEFT JOIN entries e ON e.merchant_id = l.merchant_id AND e.lot_id = l.lot_id
             GROUP BY l.lot_id, l.remaining
            """
        )
    wrong = [
        f"account {row['user_id']}: balance {row['balance']} debt {row['debt']}, entries {row['entries']} "
        f"owed {row['owed']}"
        for row in accounts
        if (row["balance"], row["debt"]) != (row["entries"], row["owed"])
    ]
    wrong += [
        f"lot {row['lot_id']}: remaining {row['remaining']}, entries {row['entries']}"
        for row in lots
        if row["remaining"] != row["entries"]
    ]
    return wrong
