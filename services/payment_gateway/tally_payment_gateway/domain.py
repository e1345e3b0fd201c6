"""The payment's rules: its state machine, its amounts, and the refusal of card data.

Pure: no I/O, no clock (callers pass the instant in `Change.at`), no protobuf. Ids come from
the caller (uuid4 unless a test wants them predictable). Money is an integer number of minor
units in the payment's currency.

How a payment changes
---------------------
`open_payment` records a payment PENDING with its first operation, PURCHASE or AUTHORIZE,
pending. Every later change is `transition(payment, event, change)`, which returns the
payment after the event, the audit record of the change and the notices to publish:

- a caller's request starts an operation (`BeginCapture`, `BeginVoid`, `BeginRefund`): it is
  checked against the state and the amounts, and recorded as the payment's `pending`
  operation before the provider is called, so that a crash during the call leaves a trace
  the reconciliation job finds;
- the provider's answer settles the pending operation (`Approved`, `Held`, `Refused`), or
  its silence makes the payment UNKNOWN (`OutcomeUnknown`) until the reconciliation job has
  asked the provider what happened and reports it with the same events (`Refused` with
  NOT_FOUND_AT_PROVIDER when nothing happened: the payment goes back to where it was, or
  fails when it was the first call);
- the provider reports changes made on its side (`ReviewApproved`, `ReviewDeclined`,
  `ProviderCaptured`, `ProviderVoided`, `ProviderRefunded`, `ChargedBack`).

One operation at a time: while one is pending every other change is refused with
FAILED_PRECONDITION, PAYMENT_BUSY (or PAYMENT_OUTCOME_UNKNOWN once the payment is UNKNOWN);
a provider's report refused this way is worth retrying once the operation is settled. A
report of something already recorded (the webhook that echoes a refund made through Tally)
changes nothing: its `Transition` has no audit record and no notice.

Amounts always satisfy refunded <= captured <= amount and chargeback <= captured, and a
payment in a final state (REFUNDED, VOIDED, FAILED, CHARGED_BACK) never changes again.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from tally_kit.amounts import Money, check_currency
from tally_kit.errors import FailedPrecondition, FieldViolation, InvalidArgument, RuleViolation


class PaymentState(enum.Enum):
    PENDING = "pending"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    VOIDED = "voided"
    FAILED = "failed"
    UNKNOWN = "unknown"
    CHARGED_BACK = "charged_back"


FINAL_STATES = frozenset(
    {PaymentState.REFUNDED, PaymentState.VOIDED, PaymentState.FAILED, PaymentState.CHARGED_BACK}
)
# A payment in one of these states holds its order: no other payment may be opened for it.
# Failed and voided payments took no money, so the order may be paid another way; a refunded
# or charged-back order was settled once and the ledger never settles an order twice.
ORDER_HOLDING_STATES = frozenset(PaymentState) - {PaymentState.FAILED, PaymentState.VOIDED}
_REFUNDABLE_STATES = frozenset({PaymentState.CAPTURED, PaymentState.PARTIALLY_REFUNDED})
# States reached only once the provider approved the payment (or its review did).
_APPROVED_STATES = frozenset(
    {
        PaymentState.AUTHORIZED,
        PaymentState.CAPTURED,
        PaymentState.PARTIALLY_REFUNDED,
        PaymentState.REFUNDED,
        PaymentState.VOIDED,
        PaymentState.CHARGED_BACK,
    }
)


class Intent(enum.Enum):
    PURCHASE = "purchase"
    AUTHORIZE = "authorize"


class Operation(enum.Enum):
    PURCHASE = "purchase"
    AUTHORIZE = "authorize"
    CAPTURE = "capture"
    VOID = "void"
    REFUND = "refund"


_FIRST_OPERATIONS = frozenset({Operation.PURCHASE, Operation.AUTHORIZE})


class Origin(enum.Enum):
    """Who started a change: a call to Tally, or the provider (its dashboard, its review)."""

    TALLY = "tally"
    PROVIDER = "provider"


# Failure codes Tally sets itself; providers' own codes travel in `failure_message`.
DECLINED = "DECLINED"
PROVIDER_ERROR = "PROVIDER_ERROR"
REVIEW_DECLINED = "REVIEW_DECLINED"
NOT_FOUND_AT_PROVIDER = "NOT_FOUND_AT_PROVIDER"

# Lengths the provider's records allow (Authorize.Net: `invoiceNumber` 20, `description` 255).
PROVIDER_ORDER_REFERENCE_LENGTH = 20
MAX_DESCRIPTION_LENGTH = 255
MAX_REFUND_REASON_LENGTH = 500


@dataclass(frozen=True)
class PendingOperation:
    """A call to the provider in flight, or whose outcome is unknown."""

    operation: Operation
    # Where the payment goes back to when the operation turns out not to have happened.
    resume_state: PaymentState
    # What the operation moves: the payment's amount for PURCHASE, AUTHORIZE and VOID, the
    # amount to capture or to refund otherwise.
    amount_minor: int
    started_at: datetime
    # Set for REFUND: the id the refund will have, and the caller's reason.
    refund_id: UUID | None = None
    reason: str = ""


@dataclass(frozen=True)
class RefundRecord:
    refund_id: UUID
    amount_minor: int
    # The provider's transaction id of the refund: one record per provider transaction.
    provider_reference: str
    origin: Origin
    reason: str
    created_at: datetime


@dataclass(frozen=True)
class ChargebackRecord:
    chargeback_id: str
    amount_minor: int
    created_at: datetime


@dataclass(frozen=True)
class Payment:
    payment_id: UUID
    merchant_id: str
    user_id: str
    order_id: str
    product_id: str
    intent: Intent
    currency: str
    # Asked for, then authorized: greater than 0.
    amount_minor: int
    state: PaymentState
    # The provider holding the payment, e.g. `authorize_net`.
    provider: str
    created_at: datetime
    updated_at: datetime
    payment_method_id: UUID | None = None
    description: str = ""
    captured_minor: int = 0
    refunds: tuple[RefundRecord, ...] = ()
    chargeback: ChargebackRecord | None = None
    # The provider's transaction id of the authorization (or purchase); captures and voids
    # act on that same transaction, refunds get their own.
    provider_reference: str = ""
    held_for_review: bool = False
    pending: PendingOperation | None = None
    failure_code: str = ""
    failure_message: str = ""
    # The card as the provider reports it: masked number (`XXXX1111`) and brand (`Visa`).
    account_suffix: str = ""
    account_type: str = ""

    @property
    def refunded_minor(self) -> int:
        return sum(refund.amount_minor for refund in self.refunds)

    @property
    def refundable_minor(self) -> int:
        """What may still be refunded: captured and not refunded yet."""
        return self.captured_minor - self.refunded_minor

    @property
    def provider_order_reference(self) -> str:
        return provider_order_reference(self.payment_id)

    def money(self, amount_minor: int) -> Money:
        return Money(amount_minor, self.currency)


@dataclass(frozen=True)
class Change:
    """Who makes a change, under which correlation id, and when."""

    actor: str
    correlation_id: str
    at: datetime


# Events: what a caller asks for, what the provider answers, what the provider reports.


@dataclass(frozen=True)
class BeginCapture:
    # None captures the whole authorized amount.
    amount_minor: int | None = None


@dataclass(frozen=True)
class BeginVoid:
    pass


@dataclass(frozen=True)
class BeginRefund:
    refund_id: UUID
    # None refunds everything still refundable.
    amount_minor: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class Approved:
    """The provider approved the pending operation (or shows it took place)."""

    # The transaction id: the authorization's for PURCHASE and AUTHORIZE (and, unchanged, for
    # CAPTURE and VOID), the refund's own for REFUND.
    provider_reference: str
    account_suffix: str = ""
    account_type: str = ""


@dataclass(frozen=True)
class Held:
    """The provider holds the pending PURCHASE or AUTHORIZE for the merchant's review."""

    provider_reference: str
    account_suffix: str = ""
    account_type: str = ""


@dataclass(frozen=True)
class Refused:
    """The pending operation did not take place: declined, refused, or not found at the provider."""

    code: str
    message: str


@dataclass(frozen=True)
class OutcomeUnknown:
    """The provider did not answer the pending operation in time."""


@dataclass(frozen=True)
class ReviewApproved:
    pass


@dataclass(frozen=True)
class ReviewDeclined:
    message: str = ""


@dataclass(frozen=True)
class ProviderCaptured:
    """An authorization was captured at the provider (its dashboard)."""

    amount_minor: int


@dataclass(frozen=True)
class ProviderVoided:
    """The payment's transaction was voided at the provider.

    An authorization voided is VOIDED. A capture voided before it settled gives all its money
    back: it is recorded as a refund of everything captured, under `refund_id`.
    """

    refund_id: UUID


@dataclass(frozen=True)
class ProviderRefunded:
    """A refund made at the provider, or the provider's echo of one made through Tally."""

    refund_id: UUID
    provider_reference: str
    amount_minor: int


@dataclass(frozen=True)
class ChargedBack:
    chargeback_id: str
    amount_minor: int


Event = (
    BeginCapture
    | BeginVoid
    | BeginRefund
    | Approved
    | Held
    | Refused
    | OutcomeUnknown
    | ReviewApproved
    | ReviewDeclined
    | ProviderCaptured
    | ProviderVoided
    | ProviderRefunded
    | ChargedBack
)


class NoticeKind(enum.Enum):
    """The event a change publishes (see `tally_payment_gateway.events`)."""

    CAPTURED = "captured"
    REFUNDED = "refunded"
    CHARGED_BACK = "charged_back"
    VOIDED = "voided"
    FAILED = "failed"


@dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    at: datetime
    # Set for REFUNDED: the refund it announces.
    refund: RefundRecord | None = None


@dataclass(frozen=True)
class AuditRecord:
    payment_id: UUID
    # What happened, e.g. `capture_started`, `capture_approved`, `refunded_at_provider`.
    action: str
    actor: str
    # None when the payment was opened.
    state_before: PaymentState | None
    state_after: PaymentState
    correlation_id: str
    at: datetime
    # Amounts and references the change involved; never card data.
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Transition:
    payment: Payment
    # None when the event changed nothing (a report of something already recorded).
    audit: AuditRecord | None
    notices: tuple[Notice, ...] = ()


def open_payment(
    *,
    payment_id: UUID,
    merchant_id: str,
    user_id: str,
    order_id: str,
    product_id: str,
    intent: Intent,
    amount: Money,
    provider: str,
    change: Change,
    payment_method_id: UUID | None = None,
    description: str = "",
) -> Transition:
    """A new payment, PENDING, its PURCHASE or AUTHORIZE about to be sent to the provider."""
    _require_positive(amount.amount_minor, "amount.amount_minor")
    check_currency(amount.currency)
    operation = Operation.PURCHASE if intent is Intent.PURCHASE else Operation.AUTHORIZE
    payment = Payment(
        payment_id=payment_id,
        merchant_id=merchant_id,
        user_id=user_id,
        order_id=order_id,
        product_id=product_id,
        intent=intent,
        currency=amount.currency,
        amount_minor=amount.amount_minor,
        state=PaymentState.PENDING,
        provider=provider,
        created_at=change.at,
        updated_at=change.at,
        payment_method_id=payment_method_id,
        description=description,
        pending=PendingOperation(
            operation=operation,
            resume_state=PaymentState.PENDING,
            amount_minor=amount.amount_minor,
            started_at=change.at,
        ),
    )
    audit = _audit(
        None, payment, f"{operation.value}_started", change, {"amount_minor": str(amount.amount_minor)}
    )
    return Transition(payment, audit)


def transition(payment: Payment, event: Event, change: Change) -> Transition:
    """The payment after `event`, or FailedPrecondition when its state does not allow it."""
    match event:
        case BeginCapture():
            return _begin_capture(payment, event, change)
        case BeginVoid():
            return _begin_void(payment, change)
        case BeginRefund():
            return _begin_refund(payment, event, change)
        case Approved():
            return _approved(payment, event, change)
        case Held():
            return _held(payment, event, change)
        case Refused():
            return _refused(payment, event, change)
        case OutcomeUnknown():
            return _outcome_unknown(payment, change)
        case ReviewApproved():
            return _review_approved(payment, change)
        case ReviewDeclined():
            return _review_declined(payment, event, change)
        case ProviderCaptured():
            return _provider_captured(payment, event, change)
        case ProviderVoided():
            return _provider_voided(payment, event, change)
        case ProviderRefunded():
            return _provider_refunded(payment, event, change)
        case ChargedBack():
            return _charged_back(payment, event, change)
    raise TypeError(f"not a payment event: {event!r}")


# A caller's request.


def _begin_capture(payment: Payment, event: BeginCapture, change: Change) -> Transition:
    _require_idle(payment)
    if payment.state is not PaymentState.AUTHORIZED:
        raise _refusal(payment, "PAYMENT_NOT_CAPTURABLE", "only an authorized payment can be captured")
    amount = payment.amount_minor if event.amount_minor is None else event.amount_minor
    _require_positive(amount, "amount.amount_minor")
    if amount > payment.amount_minor:
        raise FailedPrecondition(
            f"cannot capture {amount}: {payment.amount_minor} was authorized",
            reason="AMOUNT_EXCEEDS_AUTHORIZED",
            metadata={"authorized_minor": str(payment.amount_minor)},
        )
    return _begin(payment, Operation.CAPTURE, amount, change)


def _begin_void(payment: Payment, change: Change) -> Transition:
    _require_idle(payment)
    if payment.state is not PaymentState.AUTHORIZED:
        raise _refusal(
            payment, "PAYMENT_NOT_VOIDABLE", "only an authorized payment can be voided; refund a captured one"
        )
    return _begin(payment, Operation.VOID, payment.amount_minor, change)


def _begin_refund(payment: Payment, event: BeginRefund, change: Change) -> Transition:
    _require_idle(payment)
    if payment.state not in _REFUNDABLE_STATES:
        raise _refusal(payment, "PAYMENT_NOT_REFUNDABLE", "only a captured payment can be refunded")
    amount = payment.refundable_minor if event.amount_minor is None else event.amount_minor
    _require_positive(amount, "amount.amount_minor")
    if amount > payment.refundable_minor:
        raise FailedPrecondition(
            f"cannot refund {amount}: {payment.refundable_minor} is left to refund",
            reason="AMOUNT_EXCEEDS_REFUNDABLE",
            metadata={"refundable_minor": str(payment.refundable_minor)},
        )
    return _begin(payment, Operation.REFUND, amount, change, refund_id=event.refund_id, reason=event.reason)


def _begin(
    payment: Payment,
    operation: Operation,
    amount_minor: int,
    change: Change,
    *,
    refund_id: UUID | None = None,
    reason: str = "",
) -> Transition:
    pending = PendingOperation(
        operation=operation,
        resume_state=payment.state,
        amount_minor=amount_minor,
        started_at=change.at,
        refund_id=refund_id,
        reason=reason,
    )
    after = _changed(payment, change, pending=pending)
    return Transition(
        after,
        _audit(payment, after, f"{operation.value}_started", change, {"amount_minor": str(amount_minor)}),
    )


# The provider's answer to the pending operation.


def _approved(payment: Payment, event: Approved, change: Change) -> Transition:
    pending = _require_pending(payment, "approve")
    details = {"provider_reference": event.provider_reference}
    action = f"{pending.operation.value}_approved"
    match pending.operation:
        case Operation.PURCHASE | Operation.AUTHORIZE:
            after = _approve_first_call(
                payment, change, event.provider_reference, event.account_suffix, event.account_type
            )
            notices = _capture_notices(after, change)
        case Operation.CAPTURE:
            after = _changed(
                payment,
                change,
                state=PaymentState.CAPTURED,
                captured_minor=pending.amount_minor,
                pending=None,
            )
            notices = _capture_notices(after, change)
        case Operation.VOID:
            after = _changed(payment, change, state=PaymentState.VOIDED, pending=None)
            notices = (Notice(NoticeKind.VOIDED, change.at),)
        case Operation.REFUND:
            if _refund_recorded(payment, event.provider_reference):
                # The provider's webhook recorded this refund first: only the call is settled,
                # and a payment whose call went UNKNOWN shows its refunds again.
                after = _changed(payment, change, state=_refunded_state(payment, 0), pending=None)
                notices = ()
            else:
                refund = RefundRecord(
                    refund_id=_require_refund_id(pending),
                    amount_minor=pending.amount_minor,
                    provider_reference=event.provider_reference,
                    origin=Origin.TALLY,
                    reason=pending.reason,
                    created_at=change.at,
                )
                after = _with_refund(payment, refund, change)
                notices = (Notice(NoticeKind.REFUNDED, change.at, refund),)
    after = dataclasses.replace(after, failure_code="", failure_message="")
    return Transition(after, _audit(payment, after, action, change, details), notices)


def _approve_first_call(
    payment: Payment, change: Change, provider_reference: str, account_suffix: str, account_type: str
) -> Payment:
    purchase = payment.intent is Intent.PURCHASE
    return _changed(
        payment,
        change,
        state=PaymentState.CAPTURED if purchase else PaymentState.AUTHORIZED,
        captured_minor=payment.amount_minor if purchase else 0,
        provider_reference=provider_reference or payment.provider_reference,
        account_suffix=account_suffix or payment.account_suffix,
        account_type=account_type or payment.account_type,
        held_for_review=False,
        pending=None,
    )


def _held(payment: Payment, event: Held, change: Change) -> Transition:
    pending = _require_pending(payment, "hold")
    if pending.operation not in _FIRST_OPERATIONS:
        raise _illegal(payment, f"a {pending.operation.value} cannot be held for review")
    after = _changed(
        payment,
        change,
        state=PaymentState.PENDING,
        held_for_review=True,
        provider_reference=event.provider_reference,
        account_suffix=event.account_suffix or payment.account_suffix,
        account_type=event.account_type or payment.account_type,
        pending=None,
    )
    details = {"provider_reference": event.provider_reference}
    return Transition(after, _audit(payment, after, f"{pending.operation.value}_held", change, details))


def _refused(payment: Payment, event: Refused, change: Change) -> Transition:
    pending = _require_pending(payment, "refuse")
    details = {"code": event.code}
    action = f"{pending.operation.value}_refused"
    if pending.operation in _FIRST_OPERATIONS:
        after = _changed(
            payment,
            change,
            state=PaymentState.FAILED,
            pending=None,
            failure_code=event.code,
            failure_message=event.message,
        )
        return Transition(
            after, _audit(payment, after, action, change, details), (Notice(NoticeKind.FAILED, change.at),)
        )
    after = _changed(
        payment,
        change,
        state=pending.resume_state,
        pending=None,
        failure_code=event.code,
        failure_message=event.message,
    )
    return Transition(after, _audit(payment, after, action, change, details))


def _outcome_unknown(payment: Payment, change: Change) -> Transition:
    pending = _require_pending(payment, "leave unknown")
    if payment.state is PaymentState.UNKNOWN:
        return Transition(payment, None)
    after = _changed(payment, change, state=PaymentState.UNKNOWN)
    return Transition(after, _audit(payment, after, f"{pending.operation.value}_unknown", change))


# What the provider reports of changes made on its side.


def _review_approved(payment: Payment, change: Change) -> Transition:
    if payment.pending is None and payment.state in _APPROVED_STATES:
        return Transition(payment, None)
    _require_held(payment)
    after = _approve_first_call(payment, change, payment.provider_reference, "", "")
    return Transition(
        after, _audit(payment, after, "review_approved", change), _capture_notices(after, change)
    )


def _review_declined(payment: Payment, event: ReviewDeclined, change: Change) -> Transition:
    if payment.pending is None and payment.state is PaymentState.FAILED:
        return Transition(payment, None)
    _require_held(payment)
    after = _changed(
        payment,
        change,
        state=PaymentState.FAILED,
        held_for_review=False,
        failure_code=REVIEW_DECLINED,
        failure_message=event.message,
    )
    return Transition(
        after, _audit(payment, after, "review_declined", change), (Notice(NoticeKind.FAILED, change.at),)
    )


def _provider_captured(payment: Payment, event: ProviderCaptured, change: Change) -> Transition:
    if payment.captured_minor and payment.captured_minor == event.amount_minor:
        return Transition(payment, None)
    _require_idle(payment)
    if payment.state is not PaymentState.AUTHORIZED:
        raise _illegal(payment, "only an authorized payment can be captured")
    _require_positive(event.amount_minor, "amount_minor")
    if event.amount_minor > payment.amount_minor:
        raise _illegal(
            payment, f"captured {event.amount_minor} exceeds the {payment.amount_minor} authorized"
        )
    after = _changed(payment, change, state=PaymentState.CAPTURED, captured_minor=event.amount_minor)
    details = {"amount_minor": str(event.amount_minor)}
    return Transition(
        after,
        _audit(payment, after, "captured_at_provider", change, details),
        _capture_notices(after, change),
    )


def _provider_voided(payment: Payment, event: ProviderVoided, change: Change) -> Transition:
    if payment.pending is None and (
        payment.state is PaymentState.VOIDED or _refund_recorded(payment, payment.provider_reference)
    ):
        return Transition(payment, None)
    _require_idle(payment)
    if payment.state is PaymentState.AUTHORIZED:
        after = _changed(payment, change, state=PaymentState.VOIDED)
        return Transition(
            after,
            _audit(payment, after, "voided_at_provider", change),
            (Notice(NoticeKind.VOIDED, change.at),),
        )
    if payment.state is PaymentState.CAPTURED:
        refund = RefundRecord(
            refund_id=event.refund_id,
            amount_minor=payment.captured_minor,
            provider_reference=payment.provider_reference,
            origin=Origin.PROVIDER,
            reason="capture voided at the provider before settlement",
            created_at=change.at,
        )
        after = _with_refund(payment, refund, change)
        details = {"amount_minor": str(refund.amount_minor)}
        return Transition(
            after,
            _audit(payment, after, "voided_at_provider", change, details),
            (Notice(NoticeKind.REFUNDED, change.at, refund),),
        )
    raise _illegal(payment, "only an authorized, or captured and unrefunded, payment can be voided")


def _provider_refunded(payment: Payment, event: ProviderRefunded, change: Change) -> Transition:
    if _refund_recorded(payment, event.provider_reference):
        return Transition(payment, None)
    _require_idle(payment)
    if payment.state not in _REFUNDABLE_STATES:
        raise _illegal(payment, "only a captured payment can be refunded")
    _require_positive(event.amount_minor, "amount_minor")
    if event.amount_minor > payment.refundable_minor:
        raise FailedPrecondition(
            f"refund of {event.amount_minor} exceeds the {payment.refundable_minor} left to refund",
            reason="AMOUNT_EXCEEDS_REFUNDABLE",
            metadata={"refundable_minor": str(payment.refundable_minor)},
        )
    refund = RefundRecord(
        refund_id=event.refund_id,
        amount_minor=event.amount_minor,
        provider_reference=event.provider_reference,
        origin=Origin.PROVIDER,
        reason="",
        created_at=change.at,
    )
    after = _with_refund(payment, refund, change)
    details = {"amount_minor": str(event.amount_minor), "provider_reference": event.provider_reference}
    return Transition(
        after,
        _audit(payment, after, "refunded_at_provider", change, details),
        (Notice(NoticeKind.REFUNDED, change.at, refund),),
    )


def _charged_back(payment: Payment, event: ChargedBack, change: Change) -> Transition:
    if payment.chargeback is not None and payment.chargeback.chargeback_id == event.chargeback_id:
        return Transition(payment, None)
    _require_idle(payment)
    if payment.state not in _REFUNDABLE_STATES:
        raise _illegal(payment, "only a captured payment, not wholly refunded, can be charged back")
    _require_positive(event.amount_minor, "amount_minor")
    # A bank may reverse more than what is left after partial refunds: what the cardholder
    # paid bounds it, not what the merchant still holds.
    if event.amount_minor > payment.captured_minor:
        raise _illegal(
            payment, f"chargeback of {event.amount_minor} exceeds the {payment.captured_minor} captured"
        )
    chargeback = ChargebackRecord(event.chargeback_id, event.amount_minor, change.at)
    after = _changed(payment, change, state=PaymentState.CHARGED_BACK, chargeback=chargeback)
    details = {"amount_minor": str(event.amount_minor), "chargeback_id": event.chargeback_id}
    return Transition(
        after,
        _audit(payment, after, "charged_back", change, details),
        (Notice(NoticeKind.CHARGED_BACK, change.at),),
    )


# Helpers.


def _changed(payment: Payment, change: Change, **fields: object) -> Payment:
    return dataclasses.replace(payment, updated_at=change.at, **fields)


def _with_refund(payment: Payment, refund: RefundRecord, change: Change) -> Payment:
    state = _refunded_state(payment, refund.amount_minor)
    return _changed(payment, change, state=state, refunds=(*payment.refunds, refund), pending=None)


def _refunded_state(payment: Payment, more_minor: int) -> PaymentState:
    """A captured payment's state once `more_minor` is refunded on top of its refunds."""
    refunded = payment.refunded_minor + more_minor
    return PaymentState.REFUNDED if refunded == payment.captured_minor else PaymentState.PARTIALLY_REFUNDED


def _refund_recorded(payment: Payment, provider_reference: str) -> bool:
    return bool(provider_reference) and any(
        r.provider_reference == provider_reference for r in payment.refunds
    )


def _capture_notices(payment: Payment, change: Change) -> tuple[Notice, ...]:
    return (Notice(NoticeKind.CAPTURED, change.at),) if payment.state is PaymentState.CAPTURED else ()


def _require_idle(payment: Payment) -> None:
    if payment.pending is None:
        return
    if payment.state is PaymentState.UNKNOWN:
        raise FailedPrecondition(
            f"the outcome of the payment's {payment.pending.operation.value} is not known yet",
            reason="PAYMENT_OUTCOME_UNKNOWN",
            metadata={"pending_operation": payment.pending.operation.value},
        )
    raise FailedPrecondition(
        f"the payment's {payment.pending.operation.value} is in progress",
        reason="PAYMENT_BUSY",
        metadata={"pending_operation": payment.pending.operation.value},
    )


def _require_pending(payment: Payment, verb: str) -> PendingOperation:
    if payment.pending is None:
        raise _illegal(payment, f"nothing to {verb}: no call to the provider is pending")
    return payment.pending


def _require_held(payment: Payment) -> None:
    _require_idle(payment)
    if not (payment.state is PaymentState.PENDING and payment.held_for_review):
        raise _illegal(payment, "the payment is not held for review")


def _require_refund_id(pending: PendingOperation) -> UUID:
    if pending.refund_id is None:
        raise ValueError("a pending refund always carries its refund id")
    return pending.refund_id


def _require_positive(amount_minor: int, field_name: str) -> None:
    if amount_minor <= 0:
        raise InvalidArgument([FieldViolation(field_name, "must be greater than 0")])


def _refusal(payment: Payment, reason: str, message: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{message} (the payment is {payment.state.value})",
        reason=reason,
        metadata={"state": payment.state.value},
    )


def _illegal(payment: Payment, message: str) -> FailedPrecondition:
    return _refusal(payment, "ILLEGAL_TRANSITION", message)


def _audit(
    before: Payment | None,
    after: Payment,
    action: str,
    change: Change,
    details: Mapping[str, str] | None = None,
) -> AuditRecord:
    return AuditRecord(
        payment_id=after.payment_id,
        action=action,
        actor=change.actor,
        state_before=None if before is None else before.state,
        state_after=after.state,
        correlation_id=change.correlation_id,
        at=change.at,
        details=dict(details or {}),
    )


def provider_order_reference(payment_id: UUID) -> str:
    """The payment's order reference at the provider: 20 hex digits of its id.

    Authorize.Net keeps at most 20 characters of `invoiceNumber`; 80 bits of a random UUID
    make a collision within one merchant's account negligible, and the full id also travels
    in the transaction's description.
    """
    return payment_id.hex[:PROVIDER_ORDER_REFERENCE_LENGTH]


# Amounts: minor units and the decimal text providers speak.

# ISO-4217 currencies whose minor unit is not the hundredth; every other has 2 digits.
_MINOR_UNIT_DIGITS: Mapping[str, int] = {
    **dict.fromkeys(
        "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF".split(),
        0,
    ),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
}


def minor_unit_digits(currency: str) -> int:
    """How many decimal digits the currency's minor unit has: 2 for USD, 0 for JPY, 3 for KWD."""
    return _MINOR_UNIT_DIGITS.get(check_currency(currency), 2)


def format_amount(amount_minor: int, currency: str) -> str:
    """Minor units as the decimal text providers expect: 1234 USD -> "12.34", 1200 JPY -> "1200"."""
    if amount_minor < 0:
        raise RuleViolation("must not be negative")
    digits = minor_unit_digits(currency)
    return format(Decimal(amount_minor).scaleb(-digits), "f")


def parse_amount(value: Decimal, currency: str) -> int:
    """A decimal amount in the currency's major unit as exact minor units: "12.34" USD -> 1234.

    Refused when it is negative, not finite, or finer than the currency's minor unit.
    """
    if not value.is_finite() or value < 0:
        raise RuleViolation("must be a finite amount of 0 or more")
    scaled = value.scaleb(minor_unit_digits(currency))
    if scaled != scaled.to_integral_value():
        raise RuleViolation(
            f"must have at most {minor_unit_digits(currency)} fractional digits in {currency}"
        )
    return int(scaled)


# Card data: never accepted, stored or logged.

# Runs of 13 to 19 digits, optionally grouped by single spaces or dashes, not part of a longer
# run of digits.
_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
# Leading digits of the card networks' numbers: Visa 4; Mastercard 51-55 and 2221-2720; Amex
# 34, 37; Discover 6011, 644-649, 65; JCB 3528-3589; Diners 300-305, 36, 38, 39; UnionPay 62;
# Maestro 50, 56-69.
_CARD_PREFIX = re.compile(
    r"4|5[0-9]|6[0-9]|3[4-9]|30[0-5]|2(?:22[1-9]|2[3-9][0-9]|[3-6][0-9]{2}|7[01][0-9]|720)"
)
# Identifiers written as UUIDs (8-4-4-4-12 hexadecimal digits) are not card numbers, though the
# digit groups of about one in a thousand line up like one ("b374-642577194837"): they are
# taken out before the search, also where a hyphen joins them to a label ("order-<uuid>").
_UUID = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}(?![0-9A-Fa-f])")


def contains_card_number(text: str) -> bool:
    """Whether `text` holds something that is a payment card number (network prefix and Luhn)."""
    for match in _DIGIT_RUN.finditer(_UUID.sub(" ", text)):
        digits = re.sub(r"[ -]", "", match.group())
        if _CARD_PREFIX.match(digits) and _luhn_valid(digits):
            return True
    return False


def card_data_violations(fields: Iterable[tuple[str, str]]) -> list[FieldViolation]:
    """A violation for each (field path, text) holding a card number; the text is never repeated."""
    return [
        FieldViolation(path, "must not contain a card number: cards are collected by the provider's form")
        for path, text in fields
        if contains_card_number(text)
    ]


def refuse_card_data(fields: Iterable[tuple[str, str]]) -> None:
    """Refuse with INVALID_ARGUMENT (CARD_DATA_NOT_ACCEPTED) when any field holds a card number."""
    violations = card_data_violations(fields)
    if violations:
        raise InvalidArgument(violations, reason="CARD_DATA_NOT_ACCEPTED")


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0
