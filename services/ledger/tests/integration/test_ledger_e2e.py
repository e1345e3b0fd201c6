"""The ledger over gRPC beside the real catalog: a merchant, its products and an operation type
created in the catalog; users registered, purchases settled and operations recorded in the
ledger with real tokens; balances that are the sum of the history; events on RabbitMQ; and
tokens that never reach another merchant; and a captured payment published on the exchange
settling its order through the app's consumer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import pytest
from ledger_e2e import (
    PRODUCER,
    CapturedEvent,
    Catalog,
    Ledger,
    eventually,
    manual_grant_product,
    new_id,
    new_merchant_id,
    sellable_product,
)
from tally.catalog.v1 import resources_pb2 as catalog_res
from tally.common.v1.money_pb2 import Credits, Money
from tally.ledger.v1 import ledger_service_pb2 as api
from tally.ledger.v1 import resources_pb2 as res
from tally.payment_gateway.v1 import events_pb2 as payment_events_pb2
from tally_kit.events import make_envelope

pytestmark = pytest.mark.integration

OPERATION_CODE = "llm.tokens"


async def _merchant(catalog: Catalog, label: str) -> tuple[str, str]:
    """A merchant created in the catalog with a sellable 100-credit product lasting 30 days, a
    10-credit sign-up grant and the operation type `llm.tokens` at 0.002; returns the merchant
    and the sellable product."""
    merchant_id = new_merchant_id(label)
    await catalog.create_merchant(merchant_id)
    pack = sellable_product(credits="100")
    pack.access_period_days = 30
    product = await catalog.create_product(merchant_id, pack)
    welcome = manual_grant_product(name="Welcome")
    welcome.credits.value = "10"
    welcome.grant_policy = catalog_res.GRANT_POLICY_APPLY_ON_SIGNUP
    await catalog.create_product(merchant_id, welcome)
    await catalog.schedule_operation_type(merchant_id, OPERATION_CODE, "0.002")
    return merchant_id, product.product_id


def _sum(entries: list[res.LedgerEntry]) -> Decimal:
    return sum((Decimal(entry.amount.value) for entry in entries), Decimal(0))


async def test_a_purchase_and_a_consumption_end_to_end(catalog: Catalog, ledger: Ledger) -> None:
    merchant_id, product_id = await _merchant(catalog, "e2e")
    user = "user-1"

    def app(rpc: str, request: object, correlation_id: str | None = None) -> object:
        return ledger.call(rpc, request, role="app", merchant_id=merchant_id, correlation_id=correlation_id)

    registering = new_id()
    registered = await app(
        "RegisterUser",
        api.RegisterUserRequest(merchant_id=merchant_id, request_id=new_id(), user_id=user),
        registering,
    )
    assert registered.account.balance.value == "10"
    assert [(lot.credits.value, lot.source) for lot in registered.signup_lots] == [
        ("10", res.LOT_SOURCE_GRANT)
    ]

    settling = new_id()
    settled = await app(
        "SettlePurchase",
        api.SettlePurchaseRequest(
            merchant_id=merchant_id,
            request_id=new_id(),
            order_id="order-1",
            user_id=user,
            product_id=product_id,
            amount_paid=Money(amount_minor=990, currency="EUR"),
            provider_reference="psp-1",
        ),
        settling,
    )
    assert settled.lot.credits.value == "100" and settled.lot.HasField("expire_time")
    assert settled.account.balance.value == "110"

    opened = await app(
        "OpenOperation",
        api.OpenOperationRequest(
            merchant_id=merchant_id, request_id=new_id(), user_id=user, operation_code=OPERATION_CODE
        ),
    )
    closing = new_id()
    closed = await app(
        "RecordAndCloseOperation",
        api.RecordAndCloseOperationRequest(
            merchant_id=merchant_id,
            request_id=new_id(),
            operation_id=opened.operation.operation_id,
            resource_amount="12500",
        ),
        closing,
    )
    # 25 credits, FIFO: the purchase expires, the sign-up grant never does.
    assert [(e.amount.value, e.lot_id) for e in closed.entries] == [("-25", settled.lot.lot_id)]

    balance = (await app("GetBalance", api.GetBalanceRequest(merchant_id=merchant_id, user_id=user))).balance
    history = (
        await app("GetLedgerHistory", api.GetLedgerHistoryRequest(merchant_id=merchant_id, user_id=user))
    ).entries
    assert balance.balance.value == "85" and Decimal(balance.balance.value) == _sum(list(history))
    assert (balance.purchased.value, balance.granted.value) == ("75", "10")

    expected = {
        registering: ["ledger.lot_issued"],
        settling: ["ledger.purchase_settled", "ledger.lot_issued"],
        closing: ["ledger.operation_closed"],
    }
    for correlation_id, routing_keys in expected.items():
        published = await ledger.published_events(merchant_id, correlation_id)
        assert [event.routing_key for event in published] == routing_keys
        for event in published:
            assert (
                event.envelope.event_type == event.routing_key and event.envelope.merchant_id == merchant_id
            )
            assert event.envelope.producer == PRODUCER and event.persistent
    purchase = (await ledger.published_events(merchant_id, settling))[0].payload
    assert (purchase.order_id, purchase.lot_id, purchase.product_name) == (
        "order-1",
        settled.lot.lot_id,
        "Starter pack",
    )
    operation_closed = (await ledger.published_events(merchant_id, closing))[0].payload
    assert operation_closed.operation == closed.operation and list(operation_closed.entries) == list(
        closed.entries
    )


async def test_a_token_never_reaches_another_merchant(catalog: Catalog, ledger: Ledger) -> None:
    merchant_id, _ = await _merchant(catalog, "mine")
    other_id, _ = await _merchant(catalog, "theirs")
    await ledger.call(
        "RegisterUser",
        api.RegisterUserRequest(merchant_id=merchant_id, request_id=new_id(), user_id="user-1"),
        role="app",
        merchant_id=merchant_id,
    )
    balance = api.GetBalanceRequest(merchant_id=merchant_id, user_id="user-1")

    refusal = await ledger.refuse("GetBalance", balance, role="app", merchant_id=other_id)
    assert (refusal.code, refusal.reason, refusal.domain) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "MERCHANT_MISMATCH",
        "ledger.tally",
    )
    refusal = await ledger.refuse("GetBalance", balance, role="admin", merchant_id=other_id)
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MERCHANT_MISMATCH")
    # The app may not grant credits, whatever its merchant.
    grant = api.GrantCreditsRequest(
        merchant_id=merchant_id,
        request_id=new_id(),
        user_id="user-1",
        grant_key="gift-1",
        custom=api.CustomGrant(credits=Credits(value="5")),
        source=res.LOT_SOURCE_PROMOTION,
    )
    refusal = await ledger.refuse("GrantCredits", grant, role="app", merchant_id=merchant_id)
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    refusal = await ledger.refuse("GetBalance", balance, role=None)
    assert refusal.code == grpc.StatusCode.UNAUTHENTICATED

    granted = await ledger.call("GrantCredits", grant, role="admin", merchant_id=merchant_id)
    assert granted.account.balance.value == "15"


async def test_a_merchant_the_catalog_does_not_know_is_not_found(ledger: Ledger) -> None:
    ghost = new_merchant_id("ghost")
    request = api.RegisterUserRequest(merchant_id=ghost, request_id=new_id(), user_id="user-1")
    refusal = await ledger.refuse("RegisterUser", request)
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.NOT_FOUND, "MERCHANT_NOT_FOUND")
    assert ledger.databases.merchant_database(ghost) not in await ledger.databases.databases()


async def test_refusals_carry_their_reason_and_bad_fields(catalog: Catalog, ledger: Ledger) -> None:
    merchant_id, _ = await _merchant(catalog, "refusals")
    bad = api.OpenOperationRequest(
        merchant_id=merchant_id, request_id="", user_id="user 1", operation_code="x"
    )
    refusal = await ledger.refuse("OpenOperation", bad)
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert sorted(refusal.fields) == ["request_id", "user_id"]

    await ledger.call(
        "RegisterUser",
        api.RegisterUserRequest(merchant_id=merchant_id, request_id=new_id(), user_id="user-1"),
    )
    await catalog.schedule_operation_type(
        merchant_id, "later.calls", "1", effective=datetime.now(UTC) + timedelta(days=1)
    )
    later = api.OpenOperationRequest(
        merchant_id=merchant_id, request_id=new_id(), user_id="user-1", operation_code="later.calls"
    )
    refusal = await ledger.refuse("OpenOperation", later)
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.NOT_FOUND, "OPERATION_TYPE_NOT_ACTIVE")
    unknown = api.OpenOperationRequest(
        merchant_id=merchant_id, request_id=new_id(), user_id="user-1", operation_code="never.scheduled"
    )
    refusal = await ledger.refuse("OpenOperation", unknown)
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.NOT_FOUND, "OPERATION_TYPE_NOT_FOUND")


async def test_a_captured_payment_on_the_exchange_settles_the_order(catalog: Catalog, ledger: Ledger) -> None:
    merchant_id, product_id = await _merchant(catalog, "captured")
    captured = payment_events_pb2.PaymentCaptured(
        merchant_id=merchant_id,
        user_id="buyer-1",
        order_id="order-9",
        product_id=product_id,
        payment_id=new_id(),
        amount=Money(amount_minor=990, currency="EUR"),
        provider_reference="psp-9",
    )
    correlation_id = new_id()
    await ledger.publish(
        make_envelope(
            event_type="payment.captured",
            merchant_id=merchant_id,
            payload=captured,
            producer="payment-gateway",
            correlation_id=correlation_id,
        )
    )

    # The buyer is registered (a sign-up grant) and the order settled, under the event's
    # correlation id.
    def announced() -> list[CapturedEvent]:
        # The capture queue also holds the payment event itself.
        return [e for e in ledger.events.of_call(correlation_id) if e.envelope.producer == PRODUCER]

    await eventually(lambda: len(announced()) == 3)
    published = announced()
    assert sorted(event.routing_key for event in published) == [
        "ledger.lot_issued",
        "ledger.lot_issued",
        "ledger.purchase_settled",
    ]
    settled = next(event.payload for event in published if event.routing_key == "ledger.purchase_settled")
    assert (settled.order_id, settled.payment_id) == ("order-9", captured.payment_id)
    assert settled.credits.value == "100"
    request = api.GetBalanceRequest(merchant_id=merchant_id, user_id="buyer-1")
    assert (await ledger.call("GetBalance", request)).balance.balance.value == "110"
