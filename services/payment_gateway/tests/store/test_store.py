"""The payment gateway's schema and SQL on the real PostgreSQL: what the database refuses on its
own, payments read back as written, the order's partial unique index over the domain's holding
states, the webhook inbox, the audit trail, sealed tokens, listing and reconciliation claims."""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from pydantic import SecretStr
from tally_kit.amounts import Money
from tally_kit.db import MerchantDirectory
from tally_kit.errors import FailedPrecondition, Violations
from tally_kit.pagination import read_page_request
from tally_kit.uow import Transaction
from tally_payment_gateway import domain, store
from tally_payment_gateway.crypto import TokenVault
from tally_payment_gateway.domain import (
    ORDER_HOLDING_STATES,
    AuditRecord,
    Change,
    ChargebackRecord,
    Intent,
    Origin,
    PaymentState,
    PendingOperation,
    RefundRecord,
    Transition,
)
from tally_payment_gateway.webhooks import Notification

from .conftest import MERCHANT

T0 = datetime(2030, 1, 1, tzinfo=UTC)
# Clears a payment's pending call.
NO_CALL = (
    "pending_operation = NULL, pending_resume_state = NULL, pending_amount_minor = NULL, "
    "pending_started_at = NULL, pending_reason = NULL"
)
CHANGE = Change(actor="platform:store-tests", correlation_id="corr-store", at=T0)


@pytest.fixture
async def tx(directory: MerchantDirectory) -> AsyncIterator[Transaction]:
    """A merchant transaction rolled back at the end of the test: tests leave nothing behind."""
    async with directory.connection(MERCHANT) as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            yield Transaction(conn, merchant_id=MERCHANT, producer=store.PRODUCER)
        finally:
            await transaction.rollback()


def opened(order_id: str | None = None, intent: Intent = Intent.PURCHASE, at: datetime = T0) -> Transition:
    return domain.open_payment(
        payment_id=uuid.uuid4(),
        merchant_id=MERCHANT,
        user_id="user-1",
        order_id=order_id or f"order-{secrets.token_hex(4)}",
        product_id=str(uuid.uuid4()),
        intent=intent,
        amount=Money(1000, "USD"),
        provider="authorize_net",
        change=dataclasses.replace(CHANGE, at=at),
        description="10 credits",
    )


def in_state(state: PaymentState, order_id: str) -> Transition:
    """A payment as it would stand in `state`, consistent in every column, opened as such."""
    authorization = state in (PaymentState.AUTHORIZED, PaymentState.VOIDED)
    base = opened(order_id, Intent.AUTHORIZE if authorization else Intent.PURCHASE)
    payment = dataclasses.replace(base.payment, pending=None, provider_reference="60000000001")
    captured = dataclasses.replace(payment, captured_minor=payment.amount_minor)
    refund = RefundRecord(uuid.uuid4(), 400, "60000000002", Origin.TALLY, "", T0)
    full_refund = dataclasses.replace(refund, amount_minor=1000)
    match state:
        case PaymentState.PENDING | PaymentState.UNKNOWN:
            payment = dataclasses.replace(base.payment, state=state)
        case PaymentState.AUTHORIZED | PaymentState.VOIDED:
            payment = dataclasses.replace(payment, state=state)
        case PaymentState.CAPTURED:
            payment = dataclasses.replace(captured, state=state)
        case PaymentState.PARTIALLY_REFUNDED:
            payment = dataclasses.replace(captured, state=state, refunds=(refund,))
        case PaymentState.REFUNDED:
            payment = dataclasses.replace(captured, state=state, refunds=(full_refund,))
        case PaymentState.FAILED:
            payment = dataclasses.replace(payment, state=state, failure_code=domain.DECLINED)
        case PaymentState.CHARGED_BACK:
            payment = dataclasses.replace(
                captured, state=state, chargeback=ChargebackRecord("dispute-1", 1000, T0)
            )
    audit = dataclasses.replace(base.audit, state_after=state) if base.audit else None
    return Transition(payment, audit)


async def test_a_payment_reads_back_as_written_with_its_refunds_chargeback_and_pending_call(
    tx: Transaction,
) -> None:
    for state in PaymentState:
        written = in_state(state, f"order-{secrets.token_hex(4)}")
        await store.record(tx, None, written)
        assert await store.get_payment(tx.conn, MERCHANT, written.payment.payment_id) == written.payment
    pending = opened()
    await store.record(tx, None, pending)
    read = await store.get_payment(tx.conn, MERCHANT, pending.payment.payment_id, lock=True)
    assert read == pending.payment
    assert read is not None and read.pending == PendingOperation(
        domain.Operation.PURCHASE, PaymentState.PENDING, 1000, T0
    )


@pytest.mark.parametrize("state", list(PaymentState), ids=lambda state: state.value)
async def test_an_order_is_held_by_exactly_the_domains_holding_states(
    tx: Transaction, state: PaymentState
) -> None:
    order_id = f"order-{secrets.token_hex(4)}"
    await store.record(tx, None, in_state(state, order_id))
    if state in ORDER_HOLDING_STATES:
        with pytest.raises(FailedPrecondition) as refused:
            async with tx.conn.transaction():
                await store.record(tx, None, opened(order_id))
        assert refused.value.reason == "ORDER_ALREADY_PAID"
    else:
        await store.record(tx, None, opened(order_id))


async def test_a_transition_writes_the_payment_its_new_refund_its_audit_row_and_its_event(
    tx: Transaction,
) -> None:
    start = opened()
    await store.record(tx, None, start)
    payment = await store.apply(
        tx, start.payment, [domain.Approved("60000000010", "XXXX1111", "Visa")], CHANGE
    )
    refund_id = uuid.uuid4()
    payment = await store.apply(tx, payment, [domain.BeginRefund(refund_id, 300, "asked")], CHANGE)
    payment = await store.apply(tx, payment, [domain.Approved("60000000011")], CHANGE)
    read = await store.get_payment(tx.conn, MERCHANT, payment.payment_id)
    assert read == payment
    assert read is not None and read.state is PaymentState.PARTIALLY_REFUNDED and read.refunded_minor == 300
    trail = await store.audit_trail(tx.conn, MERCHANT, payment.payment_id)
    assert [(row.action, row.state_before, row.state_after) for row in trail] == [
        ("purchase_started", None, PaymentState.PENDING),
        ("purchase_approved", PaymentState.PENDING, PaymentState.CAPTURED),
        ("refund_started", PaymentState.CAPTURED, PaymentState.CAPTURED),
        ("refund_approved", PaymentState.CAPTURED, PaymentState.PARTIALLY_REFUNDED),
    ]
    assert {row.actor for row in trail} == {CHANGE.actor}
    assert {row.correlation_id for row in trail} == {CHANGE.correlation_id}
    assert trail[-1].details == {"provider_reference": "60000000011"}
    outbox = await tx.conn.fetch("SELECT event_type FROM outbox ORDER BY id")
    assert [row["event_type"] for row in outbox] == ["payment.captured", "payment.refunded"]


async def test_a_change_that_changes_nothing_writes_nothing(tx: Transaction) -> None:
    start = opened()
    await store.record(tx, None, start)
    captured = await store.apply(tx, start.payment, [domain.Approved("60000000020")], CHANGE)
    audit_rows = await tx.conn.fetchval("SELECT count(*) FROM payment_audit")
    # The provider's echo of the capture Tally recorded.
    again = await store.apply(tx, captured, [domain.ProviderCaptured(captured.captured_minor)], CHANGE)
    assert again == captured
    assert await tx.conn.fetchval("SELECT count(*) FROM payment_audit") == audit_rows


async def test_the_audit_trail_is_append_only(tx: Transaction) -> None:
    await store.record(tx, None, opened())
    for statement in ("UPDATE payment_audit SET actor = 'someone else'", "DELETE FROM payment_audit"):
        with pytest.raises(asyncpg.RestrictViolationError):
            async with tx.conn.transaction():
                await tx.conn.execute(statement)


@pytest.mark.parametrize(
    "assignment",
    [
        "captured_minor = amount_minor + 1",
        "refunded_minor = 1",
        "state = 'failed'",
        f"state = 'unknown', {NO_CALL}",
        "pending_refund_id = gen_random_uuid()",
        f"held_for_review = true, state = 'captured', captured_minor = amount_minor, {NO_CALL}",
        "account_suffix = '4111111111111111'",
        "state = 'refunded', captured_minor = 500, refunded_minor = 400",
    ],
)
async def test_the_database_refuses_what_the_domain_forbids(tx: Transaction, assignment: str) -> None:
    start = opened()
    await store.record(tx, None, start)
    with pytest.raises(asyncpg.CheckViolationError):
        await tx.conn.execute(
            f"UPDATE payments SET {assignment} WHERE payment_id = $1", start.payment.payment_id
        )


async def test_a_notification_is_received_once_per_id(tx: Transaction) -> None:
    notification = Notification(
        notification_id=str(uuid.uuid4()),
        event_type="net.authorize.payment.refund.created",
        event_date=T0,
        webhook_id="webhook-1",
        entity_name="transaction",
        entity_id="60000000030",
        response_code=1,
        auth_amount=None,
        invoice_number="",
        dispute_id="",
    )
    assert await store.receive_notification(tx.conn, MERCHANT, "authorize_net", notification, b"{}", T0)
    assert not await store.receive_notification(tx.conn, MERCHANT, "authorize_net", notification, b"{}", T0)
    await store.finish_notification(tx.conn, MERCHANT, notification.notification_id, "applied", T0)
    row = await tx.conn.fetchrow(
        "SELECT outcome, processed_at FROM webhook_notifications WHERE notification_id = $1",
        notification.notification_id,
    )
    assert (row["outcome"], row["processed_at"]) == ("applied", T0)


async def test_a_saved_token_is_kept_only_as_ciphertext_bound_to_its_row(tx: Transaction) -> None:
    vault = TokenVault.from_base64({"k1": SecretStr("g2QuI/JnaC1YGm3EgcpLbXb+7yy2VokUbVKu7UxRuXQ=")}, "k1")
    token = "1512345678/1512987654"
    method_id = uuid.uuid4()
    method = store.StoredPaymentMethod(
        payment_method_id=method_id,
        merchant_id=MERCHANT,
        user_id="user-1",
        provider="authorize_net",
        label="Visa ending 1111",
        token=vault.seal(token, associated_data=TokenVault.binding(MERCHANT, method_id)),
        created_at=T0,
    )
    await store.insert_payment_method(tx.conn, method)
    row = await tx.conn.fetchrow("SELECT key_id, token_ciphertext FROM payment_methods")
    assert row["key_id"] == "k1"
    assert token.encode() not in row["token_ciphertext"]
    read = await store.get_payment_method(tx.conn, MERCHANT, "user-1", method_id)
    assert read == method
    assert vault.unseal(read.token, associated_data=TokenVault.binding(MERCHANT, method_id)) == token
    # Another user's method is not found for this one.
    assert await store.get_payment_method(tx.conn, MERCHANT, "user-2", method_id) is None


async def test_payments_list_newest_first_by_filter_and_page(tx: Transaction) -> None:
    written = [opened(at=T0 + timedelta(seconds=index)) for index in range(5)]
    for transition in written:
        await store.record(tx, None, transition)
    newest_first = [t.payment.payment_id for t in reversed(written)]
    violations = Violations()
    seen: list[uuid.UUID] = []
    token = ""
    while True:
        page_request = read_page_request(
            violations, page_size=2, page_token=token, scope={"list": "payments"}, key=(datetime, uuid.UUID)
        )
        page = await store.list_payments(tx.conn, MERCHANT, page_request, store.PaymentFilter())
        seen += [payment.payment_id for payment in page.items]
        token = page.next_page_token
        if not token:
            break
    assert not violations
    assert seen == newest_first
    one_order = read_page_request(violations, page_size=0, page_token="", scope={}, key=(datetime, uuid.UUID))
    by_order = await store.list_payments(
        tx.conn, MERCHANT, one_order, store.PaymentFilter(order_id=written[2].payment.order_id)
    )
    assert [payment.payment_id for payment in by_order.items] == [written[2].payment.payment_id]
    by_state = await store.list_payments(
        tx.conn, MERCHANT, one_order, store.PaymentFilter(state=PaymentState.CAPTURED)
    )
    assert by_state.items == []


async def test_reconciliation_claims_unknown_calls_and_overdue_ones_only(tx: Transaction) -> None:
    fresh = opened(at=T0)
    overdue = opened(at=T0 - timedelta(minutes=10))
    unknown = opened(at=T0)
    settled = opened(at=T0 - timedelta(minutes=10))
    for transition in (fresh, overdue, unknown, settled):
        await store.record(tx, None, transition)
    await store.apply(tx, unknown.payment, [domain.OutcomeUnknown()], CHANGE)
    await store.apply(tx, settled.payment, [domain.Approved("60000000040")], CHANGE)
    claimed = await store.claim_unsettled_calls(
        tx.conn, MERCHANT, overdue_before=T0 - timedelta(minutes=1), after=None, limit=10
    )
    assert [call.payment_id for call in claimed] == [overdue.payment.payment_id, unknown.payment.payment_id]
    rest = await store.claim_unsettled_calls(
        tx.conn, MERCHANT, overdue_before=T0 - timedelta(minutes=1), after=claimed[0], limit=10
    )
    assert [call.payment_id for call in rest] == [unknown.payment.payment_id]


async def test_audit_details_never_hold_more_than_the_domain_gave(tx: Transaction) -> None:
    start = opened()
    await store.record(tx, None, start)
    trail = await store.audit_trail(tx.conn, MERCHANT, start.payment.payment_id)
    assert trail == [
        AuditRecord(
            payment_id=start.payment.payment_id,
            action="purchase_started",
            actor=CHANGE.actor,
            state_before=None,
            state_after=PaymentState.PENDING,
            correlation_id=CHANGE.correlation_id,
            at=T0,
            details={"amount_minor": "1000"},
        )
    ]
