"""Protobuf messages <-> domain objects.

Domain to protobuf is total. Protobuf to domain is partial (enums may hold values this
build does not know, timestamps may be out of range): those helpers return None for what
cannot be mapped and leave the wording of the refusal to the validation layer.
"""

from __future__ import annotations

from datetime import datetime

from tally.ledger.v1 import resources_pb2
from tally_kit.amounts import format_decimal
from tally_kit.protobuf import credits, timestamp

from tally_ledger.domain import (
    Account,
    BalanceSummary,
    Entry,
    EntryKind,
    Lot,
    LotSource,
    LotState,
    Operation,
    OperationState,
    lot_state,
)

LOT_SOURCES: dict[int, LotSource] = {
    resources_pb2.LOT_SOURCE_PURCHASE: LotSource.PURCHASE,
    resources_pb2.LOT_SOURCE_GRANT: LotSource.GRANT,
    resources_pb2.LOT_SOURCE_CASHBACK: LotSource.CASHBACK,
    resources_pb2.LOT_SOURCE_SUBSCRIPTION: LotSource.SUBSCRIPTION,
    resources_pb2.LOT_SOURCE_PROMOTION: LotSource.PROMOTION,
    resources_pb2.LOT_SOURCE_ADJUSTMENT: LotSource.ADJUSTMENT,
}
LOT_STATES: dict[int, LotState] = {
    resources_pb2.LOT_STATE_ACTIVE: LotState.ACTIVE,
    resources_pb2.LOT_STATE_DEPLETED: LotState.DEPLETED,
    resources_pb2.LOT_STATE_EXPIRED: LotState.EXPIRED,
    resources_pb2.LOT_STATE_REFUNDED: LotState.REFUNDED,
    resources_pb2.LOT_STATE_CHARGED_BACK: LotState.CHARGED_BACK,
}
ENTRY_KINDS: dict[int, EntryKind] = {
    resources_pb2.ENTRY_KIND_LOT_ISSUED: EntryKind.LOT_ISSUED,
    resources_pb2.ENTRY_KIND_DEBIT: EntryKind.DEBIT,
    resources_pb2.ENTRY_KIND_DEBT_SETTLEMENT: EntryKind.DEBT_SETTLEMENT,
    resources_pb2.ENTRY_KIND_REFUND_REVOCATION: EntryKind.REFUND_REVOCATION,
    resources_pb2.ENTRY_KIND_CHARGEBACK_REVOCATION: EntryKind.CHARGEBACK_REVOCATION,
    resources_pb2.ENTRY_KIND_EXPIRY: EntryKind.EXPIRY,
    resources_pb2.ENTRY_KIND_ADJUSTMENT: EntryKind.ADJUSTMENT,
}
OPERATION_STATES: dict[int, OperationState] = {
    resources_pb2.OPERATION_STATE_OPEN: OperationState.OPEN,
    resources_pb2.OPERATION_STATE_CLOSED: OperationState.CLOSED,
    resources_pb2.OPERATION_STATE_CANCELED: OperationState.CANCELED,
    resources_pb2.OPERATION_STATE_TIMED_OUT: OperationState.TIMED_OUT,
}

_LOT_SOURCE_NUMBERS = {value: number for number, value in LOT_SOURCES.items()}
_LOT_STATE_NUMBERS = {value: number for number, value in LOT_STATES.items()}
_ENTRY_KIND_NUMBERS = {value: number for number, value in ENTRY_KINDS.items()}
_OPERATION_STATE_NUMBERS = {value: number for number, value in OPERATION_STATES.items()}


def lot_source(value: LotSource) -> resources_pb2.LotSource.ValueType:
    return _LOT_SOURCE_NUMBERS[value]


def entry_kind(value: EntryKind) -> resources_pb2.EntryKind.ValueType:
    return _ENTRY_KIND_NUMBERS[value]


def account(value: Account) -> resources_pb2.Account:
    return resources_pb2.Account(
        merchant_id=value.merchant_id,
        user_id=value.user_id,
        balance=credits(value.balance),
        debt=credits(value.debt),
        register_time=timestamp(value.registered_at),
    )


def lot(value: Lot, at: datetime) -> resources_pb2.Lot:
    """The lot with its state at instant `at`."""
    message = resources_pb2.Lot(
        lot_id=str(value.lot_id),
        merchant_id=value.merchant_id,
        user_id=value.user_id,
        source=lot_source(value.source),
        product_id=str(value.product_id) if value.product_id is not None else "",
        order_id=value.order_id or "",
        reference=value.reference,
        credits=credits(value.credits),
        remaining=credits(value.remaining),
        issue_time=timestamp(value.issued_at),
        state=_LOT_STATE_NUMBERS[lot_state(value, at)],
    )
    if value.expires_at is not None:
        message.expire_time.CopyFrom(timestamp(value.expires_at))
    return message


def entry(value: Entry) -> resources_pb2.LedgerEntry:
    message = resources_pb2.LedgerEntry(
        entry_id=str(value.entry_id),
        merchant_id=value.merchant_id,
        user_id=value.user_id,
        kind=entry_kind(value.kind),
        amount=credits(value.amount),
        lot_id=str(value.lot_id) if value.lot_id is not None else "",
        create_time=timestamp(value.occurred_at),
        reference=value.reference,
        revoked_lot_id=str(value.revoked_lot_id) if value.revoked_lot_id is not None else "",
        reason=value.reason or "",
        actor=value.actor or "",
    )
    if value.operation is not None:
        context = value.operation
        message.operation.CopyFrom(
            resources_pb2.OperationContext(
                operation_id=str(context.operation_id),
                operation_code=context.operation_code,
                operation_version=context.operation_version,
                resource_amount=format_decimal(context.resource_amount),
                resource_unit=context.resource_unit,
                credits_per_unit=credits(context.credits_per_unit),
                workflow_id=context.workflow_id or "",
            )
        )
    return message


def operation(value: Operation) -> resources_pb2.Operation:
    message = resources_pb2.Operation(
        operation_id=str(value.operation_id),
        merchant_id=value.merchant_id,
        user_id=value.user_id,
        operation_code=value.rate.operation_code,
        operation_version=value.rate.version,
        resource_unit=value.rate.resource_unit,
        credits_per_unit=credits(value.rate.credits_per_unit),
        workflow_id=value.workflow_id or "",
        state=_OPERATION_STATE_NUMBERS[value.state],
        open_time=timestamp(value.opened_at),
    )
    if value.closed_at is not None:
        message.close_time.CopyFrom(timestamp(value.closed_at))
    if value.resource_amount is not None:
        message.resource_amount = format_decimal(value.resource_amount)
    if value.credits is not None:
        message.credits.CopyFrom(credits(value.credits))
    return message


def balance(merchant_id: str, user_id: str, at: datetime, summary: BalanceSummary) -> resources_pb2.Balance:
    message = resources_pb2.Balance(
        merchant_id=merchant_id,
        user_id=user_id,
        read_time=timestamp(at),
        balance=credits(summary.balance),
        debt=credits(summary.debt),
        purchased=credits(summary.purchased),
        granted=credits(summary.granted),
        next_expiring_credits=credits(summary.next_expiring_credits),
        awaiting_expiry=credits(summary.awaiting_expiry),
    )
    if summary.next_expiry is not None:
        message.next_expire_time.CopyFrom(timestamp(summary.next_expiry))
    for held in summary.lots:
        lot_balance = resources_pb2.LotBalance(
            lot_id=str(held.lot_id), source=lot_source(held.source), remaining=credits(held.remaining)
        )
        if held.expires_at is not None:
            lot_balance.expire_time.CopyFrom(timestamp(held.expires_at))
        message.lots.append(lot_balance)
    return message
