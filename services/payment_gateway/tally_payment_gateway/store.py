"""The payment gateway's SQL: async functions over one merchant database's connection.

The caller owns the transaction. Every query filters on `merchant_id`, even though each
merchant has a database of its own, and binds every value.

A payment changes only through `record`, which writes a whole `domain.Transition` in the
caller's transaction: the payment's row (its call in flight included), the refunds and the
chargeback it gained, its audit row, and the events its notices announce (outbox). Callers
lock the payment's row first (`get_payment(..., lock=True)`), so that the servicer, the
webhook consumer and the reconciliation job never apply two changes to one payment at once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from google.protobuf.message import Message
from tally_kit.db.migrations import MigrationSource
from tally_kit.errors import FailedPrecondition
from tally_kit.pagination import Page, PageRequest, page_of
from tally_kit.uow import Transaction

from tally_payment_gateway import domain, events
from tally_payment_gateway.crypto import SealedToken
from tally_payment_gateway.domain import (
    AuditRecord,
    Change,
    ChargebackRecord,
    Event,
    Intent,
    Operation,
    Origin,
    Payment,
    PaymentState,
    PendingOperation,
    RefundRecord,
    Transition,
)
from tally_payment_gateway.webhooks import Notification

# The producer of the events the gateway writes to its outbox.
PRODUCER = "payment_gateway"
# Applied to every merchant database after the kit's own migrations.
MIGRATIONS = MigrationSource("payment_gateway", Path(__file__).resolve().parent / "migrations")

_ONE_HOLDING_PAYMENT_PER_ORDER = "payments_one_holding_per_order"
_BEFORE_ANY_INSTANT = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class StoredPaymentMethod:
    payment_method_id: UUID
    merchant_id: str
    user_id: str
    provider: str
    label: str
    token: SealedToken
    created_at: datetime


@dataclass(frozen=True)
class PaymentFilter:
    """ListPayments' filters; None means any."""

    user_id: str | None = None
    order_id: str | None = None
    state: PaymentState | None = None


@dataclass(frozen=True)
class UnsettledCall:
    """A payment whose call to the provider is in flight or unknown, in reconciliation order."""

    started_at: datetime
    payment_id: UUID


def order_already_paid(order_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"order {order_id} already has a payment open or paid",
        reason="ORDER_ALREADY_PAID",
        metadata={"order_id": order_id},
    )


# --- payments -----------------------------------------------------------------------------

_PAYMENT_COLUMNS = """
merchant_id, payment_id, user_id, order_id, product_id, intent, state, currency, amount_minor,
captured_minor, refunded_minor, provider, provider_reference, provider_order_reference,
payment_method_id, description, held_for_review, failure_code, failure_message, account_suffix,
account_type, pending_operation, pending_resume_state, pending_amount_minor, pending_started_at,
pending_refund_id, pending_reason, created_at, updated_at
"""

_INSERT_PAYMENT = f"""
INSERT INTO payments ({_PAYMENT_COLUMNS})
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
        $21, $22, $23, $24, $25, $26, $27, $28, $29)
"""

# Everything a transition may change; who the payment is for never changes.
_UPDATE_PAYMENT = """
UPDATE payments SET
    state = $3, captured_minor = $4, refunded_minor = $5, provider_reference = $6,
    held_for_review = $7, failure_code = $8, failure_message = $9, account_suffix = $10,
    account_type = $11, pending_operation = $12, pending_resume_state = $13,
    pending_amount_minor = $14, pending_started_at = $15, pending_refund_id = $16,
    pending_reason = $17, updated_at = $18
WHERE merchant_id = $1 AND payment_id = $2
"""

_SELECT_PAYMENT = f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE merchant_id = $1"


def _pending_values(pending: PendingOperation | None) -> tuple[Any, ...]:
    if pending is None:
        return (None, None, None, None, None, None)
    return (
        pending.operation.value,
        pending.resume_state.value,
        pending.amount_minor,
        pending.started_at,
        pending.refund_id,
        pending.reason,
    )


def _mutable_values(payment: Payment) -> tuple[Any, ...]:
    return (
        payment.state.value,
        payment.captured_minor,
        payment.refunded_minor,
        payment.provider_reference,
        payment.held_for_review,
        payment.failure_code,
        payment.failure_message,
        payment.account_suffix,
        payment.account_type,
        *_pending_values(payment.pending),
        payment.updated_at,
    )


async def _insert_payment(conn: asyncpg.Connection, payment: Payment) -> None:
    try:
        await conn.execute(
            _INSERT_PAYMENT,
            payment.merchant_id,
            payment.payment_id,
            payment.user_id,
            payment.order_id,
            UUID(payment.product_id),
            payment.intent.value,
            payment.state.value,
            payment.currency,
            payment.amount_minor,
            payment.captured_minor,
            payment.refunded_minor,
            payment.provider,
            payment.provider_reference,
            payment.provider_order_reference,
            payment.payment_method_id,
            payment.description,
            payment.held_for_review,
            payment.failure_code,
            payment.failure_message,
            payment.account_suffix,
            payment.account_type,
            *_pending_values(payment.pending),
            payment.created_at,
            payment.updated_at,
        )
    except asyncpg.UniqueViolationError as violation:
        if violation.constraint_name == _ONE_HOLDING_PAYMENT_PER_ORDER:
            raise order_already_paid(payment.order_id) from None
        raise


async def _update_payment(conn: asyncpg.Connection, payment: Payment) -> None:
    status = await conn.execute(
        _UPDATE_PAYMENT, payment.merchant_id, payment.payment_id, *_mutable_values(payment)
    )
    if status != "UPDATE 1":
        raise RuntimeError(f"payment {payment.payment_id} vanished while it was being changed")


async def record(tx: Transaction, before: Payment | None, transition: Transition) -> None:
    """Write `transition` (of `before`, or of nothing when it opened the payment) in `tx`.

    A transition without an audit record changed nothing and writes nothing. Opening a
    payment for an order another payment holds is refused with ORDER_ALREADY_PAID.
    """
    if transition.audit is None:
        return
    after = transition.payment
    if before is None:
        await _insert_payment(tx.conn, after)
        new_refunds = after.refunds
    else:
        await _update_payment(tx.conn, after)
        new_refunds = after.refunds[len(before.refunds) :]
    if new_refunds:
        await tx.conn.executemany(
            """
            INSERT INTO refunds (merchant_id, refund_id, payment_id, amount_minor, provider_reference,
                                 origin, reason, created_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            """,
            [
                (
                    after.merchant_id,
                    refund.refund_id,
                    after.payment_id,
                    refund.amount_minor,
                    refund.provider_reference,
                    refund.origin.value,
                    refund.reason,
                    refund.created_at,
                )
                for refund in new_refunds
            ],
        )
    if after.chargeback is not None and (before is None or before.chargeback is None):
        await tx.conn.execute(
            """
            INSERT INTO chargebacks (merchant_id, payment_id, chargeback_id, amount_minor, created_at)
            VALUES ($1, $2, $3, $4, $5)
            """,
            after.merchant_id,
            after.payment_id,
            after.chargeback.chargeback_id,
            after.chargeback.amount_minor,
            after.chargeback.created_at,
        )
    await _insert_audit(tx.conn, after.merchant_id, transition.audit)
    for notice in transition.notices:
        await tx.publish(*events.event_for(after, notice))


async def apply(tx: Transaction, payment: Payment, events: Sequence[Event], change: Change) -> Payment:
    """Apply `events` to the (locked) payment one after another and record each change; the
    payment after the last. A refusal (FailedPrecondition, InvalidArgument) is raised as the
    domain raises it, and the caller's transaction keeps none of the changes."""
    for event in events:
        transition = domain.transition(payment, event, change)
        await record(tx, payment, transition)
        payment = transition.payment
    return payment


async def get_payment(
    conn: asyncpg.Connection, merchant_id: str, payment_id: UUID, *, lock: bool = False
) -> Payment | None:
    """The payment with its refunds and chargeback; `lock` takes its row for the transaction."""
    return await _one_payment(conn, merchant_id, "payment_id = $2", payment_id, lock=lock)


async def find_payment_by_order_reference(
    conn: asyncpg.Connection, merchant_id: str, provider_order_reference: str, *, lock: bool = False
) -> Payment | None:
    """The payment carrying this reference at the provider (Authorize.Net `invoiceNumber`)."""
    return await _one_payment(
        conn, merchant_id, "provider_order_reference = $2", provider_order_reference, lock=lock
    )


async def find_payment_by_provider_reference(
    conn: asyncpg.Connection, merchant_id: str, provider_reference: str, *, lock: bool = False
) -> Payment | None:
    """The payment whose authorization (or purchase) is this provider transaction."""
    return await _one_payment(
        conn,
        merchant_id,
        "provider_reference = $2 AND provider_reference <> ''",
        provider_reference,
        lock=lock,
    )


async def list_payments(
    conn: asyncpg.Connection, merchant_id: str, page: PageRequest, filters: PaymentFilter
) -> Page[Payment]:
    """The merchant's payments matching `filters`, newest first."""
    conditions = ["merchant_id = $1"]
    arguments: list[Any] = [merchant_id]
    # Column names are these constants; only the values are bound.
    for column, value in (
        ("user_id", filters.user_id),
        ("order_id", filters.order_id),
        ("state", filters.state.value if filters.state is not None else None),
    ):
        if value is not None:
            arguments.append(value)
            conditions.append(f"{column} = ${len(arguments)}")
    if page.after is not None:
        arguments.extend(page.after)
        conditions.append(f"(created_at, payment_id) < (${len(arguments) - 1}, ${len(arguments)})")
    arguments.append(page.size + 1)
    payments = await _payments(
        conn,
        merchant_id,
        f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE {' AND '.join(conditions)}"
        f" ORDER BY created_at DESC, payment_id DESC LIMIT ${len(arguments)}",
        arguments,
    )
    return page_of(payments, page, lambda payment: (payment.created_at, payment.payment_id))


async def _one_payment(
    conn: asyncpg.Connection, merchant_id: str, condition: str, value: object, *, lock: bool
) -> Payment | None:
    query = f"{_SELECT_PAYMENT} AND {condition}{' FOR UPDATE' if lock else ''}"
    found = await _payments(conn, merchant_id, query, [merchant_id, value])
    return found[0] if found else None


async def _payments(
    conn: asyncpg.Connection, merchant_id: str, query: str, arguments: Sequence[object]
) -> list[Payment]:
    """The payments `query` selects with their refunds and chargebacks, read consistently: in
    the caller's transaction (whose lock on a payment keeps its refunds from changing), or else
    in a read-only snapshot of their own, so that a refund committed between the queries cannot
    show in one and not in the other."""
    if conn.is_in_transaction():
        return await _with_children(conn, merchant_id, await conn.fetch(query, *arguments))
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _with_children(conn, merchant_id, await conn.fetch(query, *arguments))


async def _with_children(
    conn: asyncpg.Connection, merchant_id: str, rows: Sequence[asyncpg.Record]
) -> list[Payment]:
    """Payments of `rows` with their refunds (oldest first) and chargebacks, in two queries."""
    if not rows:
        return []
    ids = [row["payment_id"] for row in rows]
    refunds: dict[UUID, list[RefundRecord]] = {payment_id: [] for payment_id in ids}
    for refund in await conn.fetch(
        """
        SELECT payment_id, refund_id, amount_minor, provider_reference, origin, reason, created_at
        FROM refunds WHERE merchant_id = $1 AND payment_id = ANY($2::uuid[])
        ORDER BY created_at, refund_id
        """,
        merchant_id,
        ids,
    ):
        refunds[refund["payment_id"]].append(
            RefundRecord(
                refund_id=refund["refund_id"],
                amount_minor=refund["amount_minor"],
                provider_reference=refund["provider_reference"],
                origin=Origin(refund["origin"]),
                reason=refund["reason"],
                created_at=refund["created_at"],
            )
        )
    chargebacks = {
        row["payment_id"]: ChargebackRecord(row["chargeback_id"], row["amount_minor"], row["created_at"])
        for row in await conn.fetch(
            """
            SELECT payment_id, chargeback_id, amount_minor, created_at
            FROM chargebacks WHERE merchant_id = $1 AND payment_id = ANY($2::uuid[])
            """,
            merchant_id,
            ids,
        )
    }
    return [
        _payment(row, tuple(refunds[row["payment_id"]]), chargebacks.get(row["payment_id"])) for row in rows
    ]


def _payment(
    row: asyncpg.Record, refunds: tuple[RefundRecord, ...], chargeback: ChargebackRecord | None
) -> Payment:
    pending = None
    if row["pending_operation"] is not None:
        pending = PendingOperation(
            operation=Operation(row["pending_operation"]),
            resume_state=PaymentState(row["pending_resume_state"]),
            amount_minor=row["pending_amount_minor"],
            started_at=row["pending_started_at"],
            refund_id=row["pending_refund_id"],
            reason=row["pending_reason"],
        )
    payment = Payment(
        payment_id=row["payment_id"],
        merchant_id=row["merchant_id"],
        user_id=row["user_id"],
        order_id=row["order_id"],
        product_id=str(row["product_id"]),
        intent=Intent(row["intent"]),
        currency=row["currency"],
        amount_minor=row["amount_minor"],
        state=PaymentState(row["state"]),
        provider=row["provider"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        payment_method_id=row["payment_method_id"],
        description=row["description"],
        captured_minor=row["captured_minor"],
        refunds=refunds,
        chargeback=chargeback,
        provider_reference=row["provider_reference"],
        held_for_review=row["held_for_review"],
        pending=pending,
        failure_code=row["failure_code"],
        failure_message=row["failure_message"],
        account_suffix=row["account_suffix"],
        account_type=row["account_type"],
    )
    if payment.refunded_minor != row["refunded_minor"]:
        raise RuntimeError(f"payment {payment.payment_id}: its refunds do not add up to refunded_minor")
    return payment


# --- audit --------------------------------------------------------------------------------


async def _insert_audit(conn: asyncpg.Connection, merchant_id: str, audit: AuditRecord) -> None:
    await conn.execute(
        """
        INSERT INTO payment_audit (merchant_id, payment_id, action, actor, state_before, state_after,
                                   correlation_id, details, at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        """,
        merchant_id,
        audit.payment_id,
        audit.action,
        audit.actor,
        None if audit.state_before is None else audit.state_before.value,
        audit.state_after.value,
        audit.correlation_id,
        json.dumps(dict(audit.details), sort_keys=True),
        audit.at,
    )


async def audit_trail(conn: asyncpg.Connection, merchant_id: str, payment_id: UUID) -> list[AuditRecord]:
    """Every change of the payment, oldest first."""
    rows = await conn.fetch(
        """
        SELECT action, actor, state_before, state_after, correlation_id, details, at
        FROM payment_audit WHERE merchant_id = $1 AND payment_id = $2 ORDER BY audit_id
        """,
        merchant_id,
        payment_id,
    )
    return [
        AuditRecord(
            payment_id=payment_id,
            action=row["action"],
            actor=row["actor"],
            state_before=None if row["state_before"] is None else PaymentState(row["state_before"]),
            state_after=PaymentState(row["state_after"]),
            correlation_id=row["correlation_id"],
            at=row["at"],
            details=json.loads(row["details"]),
        )
        for row in rows
    ]


async def call_correlation_id(conn: asyncpg.Connection, payment: Payment) -> str:
    """The correlation id of the request that started the payment's pending call (its audit
    row), so that whoever settles the call (its answer, a webhook, the reconciliation job)
    tells the rest of the call's story under the same id; '' when there is none."""
    if payment.pending is None:
        return ""
    correlation_id = await conn.fetchval(
        """
        SELECT correlation_id FROM payment_audit
        WHERE merchant_id = $1 AND payment_id = $2 AND action = $3
        ORDER BY audit_id DESC LIMIT 1
        """,
        payment.merchant_id,
        payment.payment_id,
        f"{payment.pending.operation.value}_started",
    )
    return correlation_id or ""


# --- reconciliation -----------------------------------------------------------------------


async def claim_unsettled_calls(
    conn: asyncpg.Connection,
    merchant_id: str,
    *,
    overdue_before: datetime,
    after: UnsettledCall | None,
    limit: int,
) -> list[UnsettledCall]:
    """Payments whose call's outcome is UNKNOWN, or whose call started before `overdue_before`
    and is still not settled (its process died, or its answer could not be recorded), oldest
    first after `after`, their rows locked with SKIP LOCKED."""
    rows = await conn.fetch(
        """
        SELECT pending_started_at, payment_id FROM payments
        WHERE merchant_id = $1 AND pending_operation IS NOT NULL
          AND (state = 'unknown' OR pending_started_at < $2)
          AND (pending_started_at, payment_id) > ($3, $4)
        ORDER BY pending_started_at, payment_id
        LIMIT $5
        FOR UPDATE SKIP LOCKED
        """,
        merchant_id,
        overdue_before,
        _BEFORE_ANY_INSTANT if after is None else after.started_at,
        UUID(int=0) if after is None else after.payment_id,
        limit,
    )
    return [UnsettledCall(row["pending_started_at"], row["payment_id"]) for row in rows]


# --- payment methods ----------------------------------------------------------------------


async def insert_payment_method(conn: asyncpg.Connection, method: StoredPaymentMethod) -> None:
    await conn.execute(
        """
        INSERT INTO payment_methods (merchant_id, payment_method_id, user_id, provider, label, key_id,
                                     token_ciphertext, created_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        """,
        method.merchant_id,
        method.payment_method_id,
        method.user_id,
        method.provider,
        method.label,
        method.token.key_id,
        method.token.ciphertext,
        method.created_at,
    )


async def get_payment_method(
    conn: asyncpg.Connection, merchant_id: str, user_id: str, payment_method_id: UUID
) -> StoredPaymentMethod | None:
    """The user's saved method; None when it does not exist or belongs to someone else."""
    row = await conn.fetchrow(
        """
        SELECT payment_method_id, merchant_id, user_id, provider, label, key_id, token_ciphertext,
               created_at
        FROM payment_methods WHERE merchant_id = $1 AND user_id = $2 AND payment_method_id = $3
        """,
        merchant_id,
        user_id,
        payment_method_id,
    )
    if row is None:
        return None
    return StoredPaymentMethod(
        payment_method_id=row["payment_method_id"],
        merchant_id=row["merchant_id"],
        user_id=row["user_id"],
        provider=row["provider"],
        label=row["label"],
        token=SealedToken(row["key_id"], row["token_ciphertext"]),
        created_at=row["created_at"],
    )


# --- resealing tokens under the active key ------------------------------------------------


async def count_tokens_not_under(conn: asyncpg.Connection, merchant_id: str, key_id: str) -> dict[str, int]:
    """How many saved tokens are sealed under each key id other than `key_id`."""
    rows = await conn.fetch(
        """
        SELECT key_id, count(*) AS tokens FROM payment_methods
        WHERE merchant_id = $1 AND key_id <> $2
        GROUP BY key_id
        """,
        merchant_id,
        key_id,
    )
    return {row["key_id"]: row["tokens"] for row in rows}


async def claim_tokens_under(
    conn: asyncpg.Connection,
    merchant_id: str,
    key_ids: Sequence[str],
    *,
    after: UUID | None,
    limit: int,
) -> list[UUID]:
    """Saved methods whose token is sealed under one of `key_ids`, in id order after `after`,
    their rows locked with SKIP LOCKED."""
    return [
        row["payment_method_id"]
        for row in await conn.fetch(
            """
            SELECT payment_method_id FROM payment_methods
            WHERE merchant_id = $1 AND key_id = ANY($2::text[]) AND payment_method_id > $3
            ORDER BY payment_method_id
            LIMIT $4
            FOR UPDATE SKIP LOCKED
            """,
            merchant_id,
            list(key_ids),
            UUID(int=0) if after is None else after,
            limit,
        )
    ]


async def get_sealed_token(
    conn: asyncpg.Connection, merchant_id: str, payment_method_id: UUID
) -> SealedToken | None:
    row = await conn.fetchrow(
        """
        SELECT key_id, token_ciphertext FROM payment_methods
        WHERE merchant_id = $1 AND payment_method_id = $2
        """,
        merchant_id,
        payment_method_id,
    )
    return None if row is None else SealedToken(row["key_id"], row["token_ciphertext"])


async def replace_sealed_token(
    conn: asyncpg.Connection,
    merchant_id: str,
    payment_method_id: UUID,
    *,
    before: SealedToken,
    after: SealedToken,
) -> bool:
    """Replaces the method's token with `after` only if it is still `before` (same key id and
    ciphertext); False when it is not, and nothing changes."""
    status = await conn.execute(
        """
        UPDATE payment_methods SET key_id = $5, token_ciphertext = $6
        WHERE merchant_id = $1 AND payment_method_id = $2 AND key_id = $3 AND token_ciphertext = $4
        """,
        merchant_id,
        payment_method_id,
        before.key_id,
        before.ciphertext,
        after.key_id,
        after.ciphertext,
    )
    return status == "UPDATE 1"


# --- webhook inbox ------------------------------------------------------------------------


async def receive_notification(
    conn: asyncpg.Connection,
    merchant_id: str,
    provider: str,
    notification: Notification,
    body: bytes,
    received_at: datetime,
) -> bool:
    """Record a notification; False when one with its id was received already."""
    inserted = await conn.fetchval(
        """
        INSERT INTO webhook_notifications (merchant_id, notification_id, provider, event_type, entity_id,
                                           body, received_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        merchant_id,
        notification.notification_id,
        provider,
        notification.event_type,
        notification.entity_id,
        body,
        received_at,
    )
    return bool(inserted)


async def finish_notification(
    conn: asyncpg.Connection, merchant_id: str, notification_id: str, outcome: str, processed_at: datetime
) -> None:
    await conn.execute(
        """
        UPDATE webhook_notifications SET processed_at = $3, outcome = $4
        WHERE merchant_id = $1 AND notification_id = $2
        """,
        merchant_id,
        notification_id,
        processed_at,
        outcome,
    )


# --- idempotency across the two transactions of a provider call ---------------------------


async def replace_stored_response(conn: asyncpg.Connection, request_id: str, response: Message) -> None:
    """Store the final response of a request whose key `tally_kit.idempotency` reserved (with
    the in-flight response) in an earlier transaction."""
    status = await conn.execute(
        "UPDATE idempotency_keys SET response = $2 WHERE request_id = $1",
        request_id,
        response.SerializeToString(deterministic=True),
    )
    if status != "UPDATE 1":
        raise RuntimeError(f"request_id '{request_id}' is not reserved")


async def release_request_id(conn: asyncpg.Connection, request_id: str) -> None:
    """Forget a request that ended with no effect, so that the caller may try it again."""
    await conn.execute("DELETE FROM idempotency_keys WHERE request_id = $1", request_id)
