"""The simulator's books: accounts, transactions, settlement batches and scripted outcomes.

In memory, no I/O: the HTTP layer (`psp_simulator.api`) reads requests into these calls and
their results into Authorize.Net's wire format.
"""

from __future__ import annotations

import enum
import itertools
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import quote

from tally_payment_gateway.settings import MERCHANT_PLACEHOLDER

# Authorize.Net's transaction statuses the simulator uses.
AUTHORIZED = "authorizedPendingCapture"
CAPTURED = "capturedPendingSettlement"
SETTLED = "settledSuccessfully"
REFUND_PENDING = "refundPendingSettlement"
REFUND_SETTLED = "refundSettledSuccessfully"
HELD = "FDSAuthorizedPendingReview"
VOIDED = "voided"
DECLINED = "declined"
CHARGED_BACK = "chargeback"

AUTH_CAPTURE = "authCaptureTransaction"
AUTH_ONLY = "authOnlyTransaction"
PRIOR_AUTH_CAPTURE = "priorAuthCaptureTransaction"
VOID = "voidTransaction"
REFUND = "refundTransaction"
CHARGE_TYPES = frozenset({AUTH_CAPTURE, AUTH_ONLY})

# The amount whose cents pick an outcome: 9000.02, 9000.03, ...
_SCRIPTED_AMOUNT_WHOLE = 9000


class Outcome(enum.Enum):
    APPROVE = "approve"
    DECLINE = "decline"
    ERROR = "error"
    REVIEW = "review"
    SLOW = "slow"
    TIMEOUT = "timeout"
    SERVER_ERROR = "server-error"
    LOST = "lost"


_OUTCOME_BY_CENTS = {
    2: Outcome.DECLINE,
    3: Outcome.ERROR,
    4: Outcome.REVIEW,
    5: Outcome.SLOW,
    6: Outcome.TIMEOUT,
    7: Outcome.SERVER_ERROR,
    8: Outcome.LOST,
}
# Longest names first, so that `sim-server-error` is not read as something shorter.
_OUTCOME_BY_TOKEN_PREFIX = sorted(
    ((f"sim-{outcome.value}", outcome) for outcome in Outcome), key=lambda item: -len(item[0])
)


class Refusal(Exception):
    """Authorize.Net's responseCode 3 for a transaction: `code` is the response reason code."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class Account:
    login: str
    transaction_key: str
    signature_key: str
    webhook_url: str | None = None


# What may stand for the merchant in a login: it ends up in a URL path.
_MERCHANT = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class AccountFamily:
    """Accounts opened on first use, one per merchant: a login is `login` with the merchant in
    place of MERCHANT_PLACEHOLDER, and the account's notifications go to `webhook_url` with the
    merchant in place of the placeholder there too (so each merchant gets its own webhooks at the
    URL its own account has in Authorize.Net)."""

    login: str
    transaction_key: str
    signature_key: str
    webhook_url: str | None = None

    def __post_init__(self) -> None:
        if self.login.count(MERCHANT_PLACEHOLDER) != 1:
            raise ValueError(
                f"the login {self.login!r} must name the merchant once, as {MERCHANT_PLACEHOLDER}"
            )

    def account(self, login: str) -> Account | None:
        """The account of the merchant `login` names; None when it is not of this family."""
        prefix, _, suffix = self.login.partition(MERCHANT_PLACEHOLDER)
        if not (login.startswith(prefix) and login.endswith(suffix)):
            return None
        merchant = login[len(prefix) : len(login) - len(suffix)]
        if not _MERCHANT.fullmatch(merchant):
            return None
        url = self.webhook_url
        return Account(
            login=login,
            transaction_key=self.transaction_key,
            signature_key=self.signature_key,
            webhook_url=None if url is None else url.replace(MERCHANT_PLACEHOLDER, quote(merchant, safe="")),
        )


@dataclass
class Transaction:
    trans_id: str
    login: str
    transaction_type: str
    status: str
    auth_amount: Decimal
    settle_amount: Decimal
    currency: str
    invoice_number: str
    description: str
    submitted_at: datetime
    response_code: int
    reason_code: str
    reason_text: str
    auth_code: str = ""
    account_number: str = "XXXX1111"
    card_type: str = "Visa"
    # For a refund, the capture it gives money back from.
    ref_trans_id: str = ""
    batch_id: str = ""
    # The refunds taken from this capture so far.
    refunded: Decimal = Decimal(0)


@dataclass
class Batch:
    batch_id: str
    settled_at: datetime


@dataclass
class Script:
    outcome: Outcome
    remaining: int
    request: str
    transaction_type: str | None = None
    invoice_number: str | None = None

    def matches(self, request: str, transaction_type: str | None, invoice_number: str | None) -> bool:
        return (
            self.request == request
            and self.transaction_type in (None, transaction_type)
            and self.invoice_number in (None, invoice_number)
        )


@dataclass
class Bank:
    accounts: dict[str, Account]
    # Accounts opened when a login of the family signs in for the first time.
    family: AccountFamily | None = None
    transactions: dict[str, Transaction] = field(default_factory=dict)
    batches: list[Batch] = field(default_factory=list)
    scripts: list[Script] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(60_000_000_001))

    def authenticate(self, login: str, transaction_key: str) -> Account | None:
        account = self.accounts.get(login)
        if account is None and self.family is not None:
            account = self.family.account(login)
        if account is None or not secrets.compare_digest(account.transaction_key, transaction_key):
            return None
        return self.accounts.setdefault(login, account)

    def scripted(
        self, request: str, transaction_type: str | None, invoice_number: str | None
    ) -> Outcome | None:
        """The outcome a queued script gives this request, using up one of its turns."""
        for script in self.scripts:
            if script.matches(request, transaction_type, invoice_number):
                script.remaining -= 1
                if script.remaining <= 0:
                    self.scripts.remove(script)
                return script.outcome
        return None

    @staticmethod
    def charge_outcome(token: str, amount: Decimal) -> Outcome:
        """The outcome a purchase's token or amount asks for; approve by default."""
        for prefix, outcome in _OUTCOME_BY_TOKEN_PREFIX:
            if token.startswith(prefix):
                return outcome
        cents = (amount * 100) % 100
        if int(amount) == _SCRIPTED_AMOUNT_WHOLE and cents == cents.to_integral_value():
            return _OUTCOME_BY_CENTS.get(int(cents), Outcome.APPROVE)
        return Outcome.APPROVE

    def charge(
        self,
        account: Account,
        *,
        transaction_type: str,
        amount: Decimal,
        currency: str,
        invoice_number: str,
        description: str,
        outcome: Outcome,
    ) -> Transaction:
        """Record an approved, declined or held purchase or authorization."""
        if outcome is Outcome.DECLINE:
            status, response_code, reason = DECLINED, 2, ("2", "This transaction has been declined.")
        elif outcome is Outcome.REVIEW:
            status, response_code = HELD, 4
            reason = ("252", "Your order has been received. Thank you for your business!")
        else:
            status = AUTHORIZED if transaction_type == AUTH_ONLY else CAPTURED
            response_code, reason = 1, ("1", "This transaction has been approved.")
        transaction = Transaction(
            trans_id=str(next(self._ids)),
            login=account.login,
            transaction_type=transaction_type,
            status=status,
            auth_amount=amount,
            settle_amount=amount if status == CAPTURED else Decimal(0),
            currency=currency,
            invoice_number=invoice_number,
            description=description,
            submitted_at=datetime.now(UTC),
            response_code=response_code,
            reason_code=reason[0],
            reason_text=reason[1],
            auth_code="" if outcome is Outcome.DECLINE else secrets.token_hex(3).upper(),
        )
        self.transactions[transaction.trans_id] = transaction
        return transaction

    def capture(self, account: Account, trans_id: str, amount: Decimal | None) -> Transaction:
        transaction = self._own(account, trans_id)
        if transaction.status in (CAPTURED, SETTLED):
            raise Refusal("311", "This transaction has already been captured.")
        if transaction.status == VOIDED:
            raise Refusal("310", "This transaction has already been voided.")
        if transaction.status != AUTHORIZED:
            raise Refusal("16", "The transaction cannot be found.")
        captured = transaction.auth_amount if amount is None else amount
        if captured > transaction.auth_amount:
            raise Refusal(
                "47",
                "The amount requested for settlement cannot be greater than the original amount authorized.",
            )
        transaction.status = CAPTURED
        transaction.settle_amount = captured
        return transaction

    def void(self, account: Account, trans_id: str) -> Transaction:
        transaction = self._own(account, trans_id)
        if transaction.status == VOIDED:
            raise Refusal("310", "This transaction has already been voided.")
        if transaction.status not in (AUTHORIZED, CAPTURED, HELD, REFUND_PENDING):
            raise Refusal("304", "The original transaction is in a closed batch.")
        if transaction.transaction_type == REFUND:
            self.transactions[transaction.ref_trans_id].refunded -= transaction.settle_amount
        transaction.status = VOIDED
        transaction.settle_amount = Decimal(0)
        return transaction

    def refund(
        self, account: Account, trans_id: str, amount: Decimal, card_last4: str, invoice_number: str
    ) -> Transaction:
        original = self._own(account, trans_id)
        if original.status != SETTLED or original.transaction_type not in CHARGE_TYPES:
            raise Refusal("54", "The referenced transaction does not meet the criteria for issuing a credit.")
        if card_last4 != original.account_number[-4:]:
            raise Refusal("54", "The referenced transaction does not meet the criteria for issuing a credit.")
        if original.refunded + amount > original.settle_amount:
            raise Refusal(
                "55",
                "The sum of credits against the referenced transaction would exceed original debit amount.",
            )
        original.refunded += amount
        refund = Transaction(
            trans_id=str(next(self._ids)),
            login=account.login,
            transaction_type=REFUND,
            status=REFUND_PENDING,
            auth_amount=amount,
            settle_amount=amount,
            currency=original.currency,
            invoice_number=invoice_number or original.invoice_number,
            description=original.description,
            submitted_at=datetime.now(UTC),
            response_code=1,
            reason_code="1",
            reason_text="This transaction has been approved.",
            account_number=original.account_number,
            card_type=original.card_type,
            ref_trans_id=original.trans_id,
        )
        self.transactions[refund.trans_id] = refund
        return refund

    def settle(self) -> Batch:
        batch = Batch(batch_id=str(next(self._ids)), settled_at=datetime.now(UTC))
        for transaction in self.transactions.values():
            if transaction.status in (CAPTURED, REFUND_PENDING):
                transaction.status = SETTLED if transaction.status == CAPTURED else REFUND_SETTLED
                transaction.batch_id = batch.batch_id
        self.batches.append(batch)
        return batch

    def review(self, trans_id: str, *, approve: bool) -> Transaction:
        transaction = self._existing(trans_id)
        if transaction.status != HELD:
            raise Refusal("16", "The transaction is not held for review.")
        if approve:
            transaction.status = AUTHORIZED if transaction.transaction_type == AUTH_ONLY else CAPTURED
            transaction.settle_amount = (
                transaction.auth_amount if transaction.status == CAPTURED else Decimal(0)
            )
            transaction.response_code, transaction.reason_code = 1, "1"
            transaction.reason_text = "This transaction has been approved."
        else:
            transaction.status = DECLINED
            transaction.response_code, transaction.reason_code = 2, "254"
            transaction.reason_text = "Your transaction has been declined after review."
        return transaction

    def chargeback(self, trans_id: str, amount: Decimal) -> Transaction:
        transaction = self._existing(trans_id)
        if transaction.status != SETTLED or transaction.transaction_type not in CHARGE_TYPES:
            raise Refusal("16", "Only a settled capture can be charged back.")
        if not Decimal(0) < amount <= transaction.settle_amount:
            raise Refusal("5", "A valid amount is required.")
        transaction.status = CHARGED_BACK
        return transaction

    def find(self, account: Account, trans_id: str) -> Transaction | None:
        transaction = self.transactions.get(trans_id)
        return transaction if transaction is not None and transaction.login == account.login else None

    def unsettled(self, account: Account) -> list[Transaction]:
        return [
            t
            for t in self.transactions.values()
            if t.login == account.login and t.status in (AUTHORIZED, CAPTURED, HELD, REFUND_PENDING)
        ]

    def batches_between(self, first: datetime, last: datetime) -> list[Batch]:
        return [batch for batch in self.batches if first <= batch.settled_at <= last]

    def batch_transactions(self, account: Account, batch_id: str) -> list[Transaction]:
        return [t for t in self.transactions.values() if t.login == account.login and t.batch_id == batch_id]

    def _own(self, account: Account, trans_id: str) -> Transaction:
        transaction = self.find(account, trans_id)
        if transaction is None:
            raise Refusal("16", "The transaction cannot be found.")
        return transaction

    def _existing(self, trans_id: str) -> Transaction:
        transaction = self.transactions.get(trans_id)
        if transaction is None:
            raise Refusal("16", "The transaction cannot be found.")
        return transaction
