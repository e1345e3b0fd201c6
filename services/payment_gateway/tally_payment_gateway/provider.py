"""The payment provider port: what the payment gateway asks of a PSP, and the answers it gets.

One implementation speaks Authorize.Net's JSON API (`authorize_net.AuthorizeNetProvider`); in
development and tests it talks to the PSP simulator, which speaks the same wire format.

A call that moves money answers with a `ProviderResult` whose `outcome` is one of:

- APPROVED: it took place;
- DECLINED: the issuer or the provider's fraud rules said no; nothing happened;
- ERROR: the provider refused the request (bad credentials, an invalid request, a transaction
  in the wrong state at the provider), or the request certainly never reached it (circuit
  open, connection refused); nothing happened;
- HELD: the provider holds a purchase or authorization for the merchant's review; the
  decision comes later, by webhook;
- UNKNOWN: no usable answer (a timeout, a server error, a garbled response): it may or may not
  have happened. Such a call is never sent again: the reconciliation job asks the provider
  (`find_transactions`, `transaction_details`) what became of it.

Queries (`transaction_details`, `find_transactions`) move no money and are retried freely; when
the provider stays unreachable they raise `ProviderUnavailable`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from tally_kit.amounts import Money
from tally_kit.errors import FailedPrecondition, Unavailable


class Outcome(enum.Enum):
    APPROVED = "approved"
    DECLINED = "declined"
    ERROR = "error"
    HELD = "held"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ProviderResult:
    outcome: Outcome
    # The provider's transaction id; empty when it recorded none (or did not answer).
    transaction_id: str = ""
    auth_code: str = ""
    # The card as the provider reports it: masked number (`XXXX1111`) and brand (`Visa`).
    account_suffix: str = ""
    account_type: str = ""
    # The provider's code for its answer (Authorize.Net: the response reason code such as
    # `1`, `2`, `54`, or the message code such as `E00007`), or one of Tally's when it gave no
    # answer: TIMEOUT, SERVER_ERROR, MALFORMED_RESPONSE, CONNECTION_FAILED, CIRCUIT_OPEN,
    # HTTP_ERROR.
    code: str = ""
    # The provider's explanation, safe to log and to show to support staff.
    message: str = ""


@dataclass(frozen=True)
class SavedToken:
    """A payment method saved at the provider (Authorize.Net: `<customer profile>/<payment profile>`)."""

    token: str = field(repr=False)


@dataclass(frozen=True)
class OneTimeToken:
    """A card the provider's own form collected, usable once (Authorize.Net Accept.js `opaqueData`)."""

    descriptor: str
    value: str = field(repr=False)


PaymentSource = SavedToken | OneTimeToken


@dataclass(frozen=True)
class ChargeRequest:
    """A purchase or an authorization."""

    amount: Money
    source: PaymentSource
    # The payment's reference at the provider (`domain.provider_order_reference`), which
    # `find_transactions` looks for.
    order_reference: str
    description: str


@dataclass(frozen=True)
class RefundRequest:
    # The captured transaction to give money back from.
    transaction_id: str
    amount: Money
    # The card's masked number the capture reported (`XXXX1111`): Authorize.Net checks the
    # last four digits against the original transaction.
    account_suffix: str
    order_reference: str


class TransactionKind(enum.Enum):
    PURCHASE = "purchase"
    AUTHORIZATION = "authorization"
    REFUND = "refund"
    OTHER = "other"


class TransactionStatus(enum.Enum):
    """Where a transaction stands at the provider, in the gateway's words."""

    # Approved, awaiting capture.
    AUTHORIZED = "authorized"
    # Money moved (a capture, or a refund's credit), settled or awaiting settlement.
    COMPLETED = "completed"
    # Held for the merchant's review.
    HELD = "held"
    VOIDED = "voided"
    # Declined by the issuer, or after review.
    DECLINED = "declined"
    # An authorization left uncaptured until it lapsed.
    EXPIRED = "expired"
    # Failed at the provider or the processor.
    ERROR = "error"
    CHARGED_BACK = "charged_back"
    OTHER = "other"


@dataclass(frozen=True)
class TransactionDetails:
    transaction_id: str
    kind: TransactionKind
    status: TransactionStatus
    # The provider's own status, e.g. `capturedPendingSettlement`.
    provider_status: str
    # Whether the provider settled it (refunds need a settled capture).
    settled: bool
    order_reference: str
    # For a refund, the transaction it gives money back from; empty otherwise.
    reference_transaction_id: str
    # Amounts in the currency's major unit, exactly as the provider reports them; the payment's
    # currency converts them to minor units (`domain.parse_amount`).
    authorized_amount: Decimal
    settled_amount: Decimal
    submitted_at: datetime
    account_suffix: str = ""
    account_type: str = ""


class ProviderNotConfigured(FailedPrecondition):
    """The merchant has no credentials for the provider."""

    default_reason = "PROVIDER_NOT_CONFIGURED"


class ProviderUnavailable(Unavailable):
    """A query could not reach the provider, even after retries (or its circuit is open)."""

    default_reason = "PROVIDER_UNAVAILABLE"


class ProviderQueryRefused(FailedPrecondition):
    """The provider answered a query with an error (bad credentials, an invalid request)."""

    default_reason = "PROVIDER_ERROR"


class PaymentProvider(Protocol):
    """A PSP, acting for each merchant with that merchant's credentials."""

    # Stored with each payment, e.g. `authorize_net`.
    name: str

    def check_saved_token(self, token: str) -> None:
        """Raise `RuleViolation` unless `token` has the form of this provider's saved tokens."""
        ...

    async def purchase(self, merchant_id: str, charge: ChargeRequest) -> ProviderResult:
        """Authorize and capture at once."""
        ...

    async def authorize(self, merchant_id: str, charge: ChargeRequest) -> ProviderResult:
        """Authorize only: the money is held until captured or voided."""
        ...

    async def capture(self, merchant_id: str, transaction_id: str, amount: Money) -> ProviderResult:
        """Capture an authorization, for at most its amount; the rest is released."""
        ...

    async def void(self, merchant_id: str, transaction_id: str) -> ProviderResult:
        """Release an authorization (or cancel a capture not settled yet)."""
        ...

    async def refund(self, merchant_id: str, refund: RefundRequest) -> ProviderResult:
        """Give back part or all of a settled capture; the result's transaction is the refund's."""
        ...

    async def transaction_details(self, merchant_id: str, transaction_id: str) -> TransactionDetails | None:
        """One transaction as the provider sees it now; None when it has no such transaction."""
        ...

    async def find_transactions(
        self, merchant_id: str, order_reference: str, since: datetime
    ) -> list[TransactionDetails]:
        """Every transaction carrying `order_reference` submitted since `since`, oldest first."""
        ...

    async def aclose(self) -> None:
        """Release the connections the provider holds."""
        ...
