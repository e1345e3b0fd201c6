"""Request messages -> commands.

Each function reads one request, collects every bad field (paths as in the proto, e.g.
`amount_paid.currency`, `custom.credits.value`) and raises one InvalidArgument naming them
all, so that no bad input reaches a database. Rules that need stored state or the clock
are the domain's, the service layer's and the servicer's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import TypeVar
from uuid import UUID

from google.protobuf.timestamp_pb2 import Timestamp
from tally.common.v1 import money_pb2
from tally.ledger.v1 import ledger_service_pb2 as api
from tally_kit import amounts, protobuf
from tally_kit.amounts import Money
from tally_kit.errors import RuleViolation, Violations
from tally_kit.idempotency import validate_request_id
from tally_kit.pagination import PageRequest, read_page_request
from tally_kit.text import check_text

from tally_ledger import domain, mapping
from tally_ledger.domain import EntryKind, LotSource, LotState, PurchaseOrder
from tally_ledger.services import Adjustment, Chargeback, CustomCredits, Grant, Refund

T = TypeVar("T")
E = TypeVar("E", bound=Enum)

# The catalog's operation codes, as the ledger's schema stores them.
OPERATION_CODE_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
MAX_PAYMENT_ID_LENGTH = 128


@dataclass(frozen=True)
class UserRef:
    merchant_id: str
    user_id: str


@dataclass(frozen=True)
class SettlePurchase:
    merchant_id: str
    order: PurchaseOrder


@dataclass(frozen=True)
class GrantCredits:
    merchant_id: str
    grant: Grant


@dataclass(frozen=True)
class OpenOperation:
    merchant_id: str
    user_id: str
    operation_code: str
    workflow_id: str | None


@dataclass(frozen=True)
class OperationRef:
    merchant_id: str
    operation_id: UUID


@dataclass(frozen=True)
class RecordAndCloseOperation:
    merchant_id: str
    operation_id: UUID
    resource_amount: Decimal


@dataclass(frozen=True)
class ApplyRefund:
    merchant_id: str
    refund: Refund


@dataclass(frozen=True)
class ApplyChargeback:
    merchant_id: str
    chargeback: Chargeback


@dataclass(frozen=True)
class ApplyAdjustment:
    merchant_id: str
    adjustment: Adjustment


@dataclass(frozen=True)
class GetBalance:
    merchant_id: str
    user_id: str
    # None means now.
    read_at: datetime | None


@dataclass(frozen=True)
class ListLots:
    merchant_id: str
    user_id: str
    page: PageRequest
    # Empty means every state.
    states: tuple[LotState, ...]


@dataclass(frozen=True)
class GetLedgerHistory:
    merchant_id: str
    user_id: str
    page: PageRequest
    # Empty means every kind.
    kinds: tuple[EntryKind, ...]
    start: datetime | None
    end: datetime | None
    workflow_id: str | None


# --- field helpers ----------------------------------------------------------------------------
#
# Each helper returns the value, or None after recording a violation (optional values that
# are absent are also None where the helper says so).


def _user_id(violations: Violations, value: str) -> str | None:
    return violations.rule("user_id", lambda: domain.check_user_id(value))


def _text(violations: Violations, field: str, value: str, max_length: int) -> str | None:
    return violations.rule(field, lambda: check_text(value, max_length))


def _optional_text(violations: Violations, field: str, value: str, max_length: int) -> str | None:
    """None when empty or invalid (recorded)."""
    return _text(violations, field, value, max_length) if value else None


def _optional_time(violations: Violations, field: str, present: bool, value: Timestamp) -> datetime | None:
    """None when absent (the caller's default applies) or invalid (recorded)."""
    if not present:
        return None
    converted = protobuf.to_datetime(value)
    if converted is None:
        violations.add(field, "must be a valid timestamp between years 1 and 9999")
    return converted


def _money(
    violations: Violations, field: str, present: bool, value: money_pb2.Money, *, allow_zero: bool
) -> Money | None:
    if not present:
        violations.add(field, "is required")
        return None
    amount_ok = violations.require(
        value.amount_minor >= 0 if allow_zero else value.amount_minor > 0,
        f"{field}.amount_minor",
        "must be 0 or more" if allow_zero else "must be greater than 0",
    )
    currency = violations.rule(f"{field}.currency", lambda: amounts.check_currency(value.currency))
    if not amount_ok or currency is None:
        return None
    return Money(amount_minor=value.amount_minor, currency=currency)


def _enum_list(
    violations: Violations, field: str, numbers: Sequence[int], known: Mapping[int, E]
) -> tuple[E, ...]:
    values: list[E] = []
    for index, number in enumerate(numbers):
        value = known.get(number)
        if value is None:
            names = ", ".join(member.name for member in known.values())
            violations.add(f"{field}[{index}]", f"must be one of {names}")
        else:
            values.append(value)
    return tuple(dict.fromkeys(values))


def _operation_code(violations: Violations, value: str) -> str | None:
    return violations.rule(
        "operation_code",
        lambda: domain.check_pattern(value, OPERATION_CODE_PATTERN, "an operation code such as llm.tokens"),
    )


def _optional_workflow_id(violations: Violations, value: str) -> str | None:
    return violations.rule("workflow_id", lambda: domain.check_external_id(value)) if value else None


# --- accounts and lots ------------------------------------------------------------------------


def register_user(request: api.RegisterUserRequest) -> UserRef:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    user_id = _user_id(violations, request.user_id)
    violations.raise_if_any()
    assert user_id is not None
    return UserRef(merchant_id=request.merchant_id, user_id=user_id)


def settle_purchase(request: api.SettlePurchaseRequest) -> SettlePurchase:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    order_id = violations.rule("order_id", lambda: domain.check_external_id(request.order_id))
    user_id = _user_id(violations, request.user_id)
    product_id = violations.uuid("product_id", request.product_id)
    amount_paid = _money(
        violations, "amount_paid", request.HasField("amount_paid"), request.amount_paid, allow_zero=True
    )
    provider_reference = _text(
        violations, "provider_reference", request.provider_reference, domain.MAX_REFERENCE_LENGTH
    )
    payment_id = _optional_text(violations, "payment_id", request.payment_id, MAX_PAYMENT_ID_LENGTH)
    violations.raise_if_any()
    assert order_id is not None and user_id is not None and product_id is not None
    assert amount_paid is not None and provider_reference is not None
    order = PurchaseOrder(
        order_id=order_id,
        user_id=user_id,
        product_id=product_id,
        amount_paid=amount_paid,
        provider_reference=provider_reference,
        payment_id=payment_id,
    )
    return SettlePurchase(merchant_id=request.merchant_id, order=order)


def _grant_source(violations: Violations, number: int, *, required: bool) -> LotSource | None:
    if number == 0 and not required:
        return LotSource.GRANT
    source = mapping.LOT_SOURCES.get(number)
    if source not in domain.GRANTABLE_SOURCES:
        names = ", ".join(sorted(source.name for source in domain.GRANTABLE_SOURCES))
        violations.add("source", "is required" if number == 0 else f"must be one of {names}")
        return None
    return source


def grant_credits(request: api.GrantCreditsRequest) -> GrantCredits:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    user_id = _user_id(violations, request.user_id)
    grant_key = violations.rule("grant_key", lambda: domain.check_grant_key(request.grant_key))
    kind = request.WhichOneof("grant")
    product_id: UUID | None = None
    custom: CustomCredits | None = None
    grant_ok = True
    if kind is None:
        violations.add("grant", "one of product_id or custom is required")
        grant_ok = False
    elif kind == "product_id":
        product_id = violations.uuid("product_id", request.product_id)
        grant_ok = product_id is not None
    else:
        credits = None
        if not request.custom.HasField("credits"):
            violations.add("custom.credits", "is required")
        else:
            credits = violations.rule(
                "custom.credits.value",
                lambda: amounts.parse_credits(request.custom.credits.value),
            )
        expires_at = _optional_time(
            violations,
            "custom.expire_time",
            request.custom.HasField("expire_time"),
            request.custom.expire_time,
        )
        expiry_ok = not request.custom.HasField("expire_time") or expires_at is not None
        if credits is not None and expiry_ok:
            custom = CustomCredits(credits=credits, expires_at=expires_at)
        grant_ok = custom is not None
    source = _grant_source(violations, request.source, required=kind == "custom")
    violations.raise_if_any()
    assert user_id is not None and grant_key is not None and source is not None and grant_ok
    grant = Grant(user_id=user_id, grant_key=grant_key, source=source, product_id=product_id, custom=custom)
    return GrantCredits(merchant_id=request.merchant_id, grant=grant)


# --- operations -------------------------------------------------------------------------------


def open_operation(request: api.OpenOperationRequest) -> OpenOperation:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    user_id = _user_id(violations, request.user_id)
    operation_code = _operation_code(violations, request.operation_code)
    workflow_id = _optional_workflow_id(violations, request.workflow_id)
    violations.raise_if_any()
    assert user_id is not None and operation_code is not None
    return OpenOperation(
        merchant_id=request.merchant_id,
        user_id=user_id,
        operation_code=operation_code,
        workflow_id=workflow_id,
    )


def record_and_close_operation(request: api.RecordAndCloseOperationRequest) -> RecordAndCloseOperation:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    operation_id = violations.uuid("operation_id", request.operation_id)
    resource_amount = None
    if not request.resource_amount:
        violations.add("resource_amount", "is required")
    else:
        resource_amount = violations.rule(
            "resource_amount", lambda: domain.parse_resource_amount(request.resource_amount)
        )
    violations.raise_if_any()
    assert operation_id is not None and resource_amount is not None
    return RecordAndCloseOperation(
        merchant_id=request.merchant_id, operation_id=operation_id, resource_amount=resource_amount
    )


def cancel_operation(request: api.CancelOperationRequest) -> OperationRef:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    operation_id = violations.uuid("operation_id", request.operation_id)
    violations.raise_if_any()
    assert operation_id is not None
    return OperationRef(merchant_id=request.merchant_id, operation_id=operation_id)


def get_operation(request: api.GetOperationRequest) -> OperationRef:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    operation_id = violations.uuid("operation_id", request.operation_id)
    violations.raise_if_any()
    assert operation_id is not None
    return OperationRef(merchant_id=request.merchant_id, operation_id=operation_id)


# --- refunds, chargebacks, adjustments --------------------------------------------------------


def apply_refund(request: api.ApplyRefundRequest) -> ApplyRefund:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    order_id = violations.rule("order_id", lambda: domain.check_external_id(request.order_id))
    reference = _text(violations, "refund_reference", request.refund_reference, domain.MAX_REFERENCE_LENGTH)
    amount = _money(
        violations,
        "amount_refunded",
        request.HasField("amount_refunded"),
        request.amount_refunded,
        allow_zero=False,
    )
    reason = _optional_text(violations, "reason", request.reason, domain.MAX_REASON_LENGTH)
    violations.raise_if_any()
    assert order_id is not None and reference is not None and amount is not None
    refund = Refund(order_id=order_id, reference=reference, amount=amount, reason=reason)
    return ApplyRefund(merchant_id=request.merchant_id, refund=refund)


def apply_chargeback(request: api.ApplyChargebackRequest) -> ApplyChargeback:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    order_id = violations.rule("order_id", lambda: domain.check_external_id(request.order_id))
    reference = _text(
        violations, "chargeback_reference", request.chargeback_reference, domain.MAX_REFERENCE_LENGTH
    )
    amount = _money(violations, "amount", request.HasField("amount"), request.amount, allow_zero=False)
    violations.raise_if_any()
    assert order_id is not None and reference is not None and amount is not None
    chargeback = Chargeback(order_id=order_id, reference=reference, amount=amount)
    return ApplyChargeback(merchant_id=request.merchant_id, chargeback=chargeback)


def _nonzero_credits(text: str) -> Decimal:
    value = amounts.parse_signed_credits(text)
    if value == 0:
        raise RuleViolation("must not be zero")
    return value


def apply_adjustment(request: api.ApplyAdjustmentRequest) -> ApplyAdjustment:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    user_id = _user_id(violations, request.user_id)
    amount = None
    if not request.HasField("amount"):
        violations.add("amount", "is required")
    else:
        amount = violations.rule("amount.value", lambda: _nonzero_credits(request.amount.value))
    reason = _text(violations, "reason", request.reason, domain.MAX_REASON_LENGTH)
    actor = _text(violations, "actor", request.actor, domain.MAX_ACTOR_LENGTH)
    violations.raise_if_any()
    assert user_id is not None and amount is not None and reason is not None and actor is not None
    adjustment = Adjustment(
        user_id=user_id, amount=amount, reason=reason, actor=actor, request_id=request.request_id
    )
    return ApplyAdjustment(merchant_id=request.merchant_id, adjustment=adjustment)


# --- reads ------------------------------------------------------------------------------------


def get_balance(request: api.GetBalanceRequest) -> GetBalance:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    user_id = _user_id(violations, request.user_id)
    read_at = _optional_time(violations, "read_time", request.HasField("read_time"), request.read_time)
    violations.raise_if_any()
    assert user_id is not None
    return GetBalance(merchant_id=request.merchant_id, user_id=user_id, read_at=read_at)


def list_lots(request: api.ListLotsRequest) -> ListLots:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    user_id = _user_id(violations, request.user_id)
    states = _enum_list(violations, "states", request.states, mapping.LOT_STATES)
    scope = {
        "list": "lots",
        "merchant_id": request.merchant_id,
        "user_id": request.user_id,
        "states": ",".join(sorted(state.value for state in states)),
    }
    page = read_page_request(
        violations,
        page_size=request.page_size,
        page_token=request.page_token,
        scope=scope,
        key=(datetime, UUID),
    )
    violations.raise_if_any()
    assert user_id is not None
    return ListLots(merchant_id=request.merchant_id, user_id=user_id, page=page, states=states)


def get_ledger_history(request: api.GetLedgerHistoryRequest) -> GetLedgerHistory:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    user_id = _user_id(violations, request.user_id)
    kinds = _enum_list(violations, "kinds", request.kinds, mapping.ENTRY_KINDS)
    start = _optional_time(violations, "start_time", request.HasField("start_time"), request.start_time)
    end = _optional_time(violations, "end_time", request.HasField("end_time"), request.end_time)
    if start is not None and end is not None:
        violations.require(end > start, "end_time", "must be later than start_time")
    workflow_id = _optional_workflow_id(violations, request.workflow_id)
    scope = {
        "list": "ledger_history",
        "merchant_id": request.merchant_id,
        "user_id": request.user_id,
        "kinds": ",".join(sorted(kind.value for kind in kinds)),
        "start": start.isoformat() if start is not None else "",
        "end": end.isoformat() if end is not None else "",
        "workflow_id": request.workflow_id,
    }
    page = read_page_request(
        violations,
        page_size=request.page_size,
        page_token=request.page_token,
        scope=scope,
        key=(datetime, int),
    )
    violations.raise_if_any()
    assert user_id is not None
    return GetLedgerHistory(
        merchant_id=request.merchant_id,
        user_id=user_id,
        page=page,
        kinds=kinds,
        start=start,
        end=end,
        workflow_id=workflow_id,
    )
