"""Receipts and credit notes: their amounts, their numbers and the rules they obey.

Pure: no I/O, no clock (callers pass instants), no protobuf.

Money is an integer number of minor units with an ISO-4217 currency; a tax rate is an exact
decimal percent. Every computation below is exact (`fractions.Fraction`), never a float.

The rounding rule
-----------------
`round_half_up(x)` is the integer nearest to x, halves going up: floor(x + 1/2).

Tax is computed per line. A line's gross is what the user paid for it. With r the rate
percent:

    net   = round_half_up(gross / (1 + r / 100))
    tax   = gross - net

so net + tax = gross exactly, whatever the rate and the currency's minor unit (JPY with 0
digits, EUR with 2, BHD or KWD with 3: all are whole minor units).

- Prices that include tax: the price is the gross and the tax is extracted from it.
- Prices that exclude tax: the checkout charged the listed net price N plus its tax
  round_half_up(N * r / 100). The extraction above gives back exactly N: the gross is
  N * (1 + r/100) + e with |e| <= 1/2, so gross / (1 + r/100) lies within
  1 / (2 * (1 + r/100)) < 1/2 of N when r > 0, and equals N when r = 0. The document then
  shows the listed price and the tax added to it, and its gross is still what was paid.

A document's totals are the sums of its lines.

A credit note reverses the receipt's tax in proportion to what is refunded, counted
cumulatively so that partial refunds never drift: with G and T the receipt's gross and tax
totals, C0 what earlier credit notes credited and C = C0 + the refund,

    tax = round_half_up(T * C / G) - round_half_up(T * C0 / G)

Refunds adding up to G therefore credit exactly T, and since T <= G every credit note's
tax lies between 0 and its own gross.

Numbers
-------
Receipts are numbered `<series>-<year>-<sequence>` (e.g. `ACME-2025-000042`) and credit
notes `<series>-<year>-CN<sequence>` (e.g. `ACME-2025-CN000007`), the sequence zero-padded
to 6 digits. Each kind has its own sequence per series and year (UTC), starting at 1 and
growing by exactly 1 per document issued; the store allocates it in the transaction that
issues the document. A receipt number ends in digits and a credit note number in `CN`
and digits, so the two never coincide, whatever the series prefixes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from uuid import UUID

from tally_kit.amounts import Money
from tally_kit.errors import FailedPrecondition

SEQUENCE_DIGITS = 6
CREDIT_NOTE_MARK = "CN"

# ISO 4217 minor-unit digits of the active currencies that do not have 2.
_ZERO_DIGIT_CURRENCIES = frozenset("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF".split())
_THREE_DIGIT_CURRENCIES = frozenset("BHD IQD JOD KWD LYD OMR TND".split())


# --- money ----------------------------------------------------------------------------------


def minor_unit_digits(currency: str) -> int:
    """How many decimal digits the currency's minor unit has: 0 (JPY), 2 (EUR) or 3 (KWD)."""
    if currency in _ZERO_DIGIT_CURRENCIES:
        return 0
    if currency in _THREE_DIGIT_CURRENCIES:
        return 3
    return 2


def format_amount(amount_minor: int, currency: str) -> str:
    """The amount in major units with thousands separators: 123456 EUR -> "1,234.56"."""
    digits = minor_unit_digits(currency)
    sign = "-" if amount_minor < 0 else ""
    major, minor = divmod(abs(amount_minor), 10**digits)
    text = f"{sign}{major:,}"
    return f"{text}.{minor:0{digits}d}" if digits else text


def format_money(amount_minor: int, currency: str) -> str:
    """E.g. "1,234.56 EUR", "1,235 JPY", "1.235 KWD"."""
    return f"{format_amount(amount_minor, currency)} {currency}"


# --- tax ------------------------------------------------------------------------------------


def round_half_up(value: Fraction) -> int:
    """The integer nearest to `value` (not negative), halves going up."""
    if value < 0:
        raise ValueError("amounts on documents are never negative")
    return (2 * value.numerator + value.denominator) // (2 * value.denominator)


@dataclass(frozen=True)
class TaxRegime:
    # Exact decimal percent from 0 to 100, e.g. Decimal("8.875").
    rate_percent: Decimal
    prices_include_tax: bool

    @property
    def rate(self) -> Fraction:
        return Fraction(self.rate_percent) / 100


@dataclass(frozen=True)
class Amounts:
    """Net, tax and gross of a line or a document, in minor units: net + tax = gross."""

    net: int
    tax: int
    gross: int

    def __post_init__(self) -> None:
        if self.net + self.tax != self.gross:
            raise ValueError(f"net {self.net} + tax {self.tax} != gross {self.gross}")
        if min(self.net, self.tax, self.gross) < 0:
            raise ValueError("amounts on documents are never negative")

    def __add__(self, other: Amounts) -> Amounts:
        return Amounts(self.net + other.net, self.tax + other.tax, self.gross + other.gross)


NO_AMOUNTS = Amounts(0, 0, 0)


def split_gross(gross: int, regime: TaxRegime) -> Amounts:
    """A line's net and tax from what was paid for it (the rounding rule of this module)."""
    net = round_half_up(Fraction(gross) / (1 + regime.rate))
    return Amounts(net=net, tax=gross - net, gross=gross)


def credited_tax(totals: Amounts, credited_gross: int) -> int:
    """The part of a receipt's tax reversed once `credited_gross` of it has been refunded."""
    if not 0 <= credited_gross <= totals.gross:
        raise ValueError(f"credited {credited_gross} outside 0..{totals.gross}")
    return round_half_up(Fraction(totals.tax * credited_gross, totals.gross))


# --- the merchant ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PostalAddress:
    address_lines: tuple[str, ...]
    locality: str
    administrative_area: str
    postal_code: str
    region_code: str


@dataclass(frozen=True)
class MerchantSnapshot:
    """The merchant's legal details as a document prints them."""

    legal_name: str
    tax_id: str
    address: PostalAddress
    # The catalog's configuration revision they were read from.
    config_revision: int


@dataclass(frozen=True)
class MerchantProfile:
    """What documents need from the merchant's configuration in the catalog."""

    merchant: MerchantSnapshot
    series_prefix: str
    tax_regime: TaxRegime


# --- numbers --------------------------------------------------------------------------------


class DocumentKind(enum.Enum):
    RECEIPT = "receipt"
    CREDIT_NOTE = "credit_note"


@dataclass(frozen=True)
class DocumentNumber:
    kind: DocumentKind
    series: str
    year: int
    sequence: int

    def __post_init__(self) -> None:
        if self.sequence < 1:
            raise ValueError("sequences start at 1")

    @property
    def text(self) -> str:
        mark = CREDIT_NOTE_MARK if self.kind is DocumentKind.CREDIT_NOTE else ""
        return f"{self.series}-{self.year:04d}-{mark}{self.sequence:0{SEQUENCE_DIGITS}d}"


def numbering_year(instant: datetime) -> int:
    """The year a document issued at `instant` is numbered in: its UTC year."""
    if instant.tzinfo is None:
        raise ValueError("instants must be aware")
    return instant.astimezone(UTC).year


# --- receipts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Purchase:
    """A settled order, as the ledger's purchase-settled event tells it."""

    merchant_id: str
    user_id: str
    order_id: str
    product_id: str
    product_name: str
    amount_paid: Money
    payment_id: str
    provider_reference: str
    lot_id: str
    settled_at: datetime


def needs_receipt(purchase: Purchase) -> bool:
    """A receipt documents money received: an order that paid nothing gets none.

    Grants never reach the receipt service as purchases (the ledger settles only sellable
    products); an order settled at 0 (free or fully discounted) is the one purchase with
    nothing to receipt.
    """
    return purchase.amount_paid.amount_minor > 0


@dataclass(frozen=True)
class ReceiptLine:
    description: str
    product_id: str
    amounts: Amounts


@dataclass(frozen=True)
class Receipt:
    receipt_id: UUID
    merchant_id: str
    user_id: str
    order_id: str
    number: DocumentNumber
    issued_at: datetime
    settled_at: datetime
    currency: str
    merchant: MerchantSnapshot
    tax_regime: TaxRegime
    lines: tuple[ReceiptLine, ...]
    payment_id: str
    provider_reference: str
    lot_id: str

    @property
    def totals(self) -> Amounts:
        total = NO_AMOUNTS
        for line in self.lines:
            total += line.amounts
        return total


def new_receipt(
    purchase: Purchase,
    profile: MerchantProfile,
    *,
    receipt_id: UUID,
    number: DocumentNumber,
    issued_at: datetime,
) -> Receipt:
    if not needs_receipt(purchase):
        raise ValueError(f"order {purchase.order_id} paid nothing: it gets no receipt")
    if number.kind is not DocumentKind.RECEIPT:
        raise ValueError("a receipt needs a receipt number")
    line = ReceiptLine(
        description=purchase.product_name,
        product_id=purchase.product_id,
        amounts=split_gross(purchase.amount_paid.amount_minor, profile.tax_regime),
    )
    return Receipt(
        receipt_id=receipt_id,
        merchant_id=purchase.merchant_id,
        user_id=purchase.user_id,
        order_id=purchase.order_id,
        number=number,
        issued_at=issued_at,
        settled_at=purchase.settled_at,
        currency=purchase.amount_paid.currency,
        merchant=profile.merchant,
        tax_regime=profile.tax_regime,
        lines=(line,),
        payment_id=purchase.payment_id,
        provider_reference=purchase.provider_reference,
        lot_id=purchase.lot_id,
    )


# --- credit notes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Refund:
    """A refund of a settled order, as the ledger's refund-applied event tells it."""

    merchant_id: str
    user_id: str
    order_id: str
    refund_reference: str
    amount_refunded: Money


@dataclass(frozen=True)
class CreditNote:
    credit_note_id: UUID
    merchant_id: str
    user_id: str
    order_id: str
    receipt_id: UUID
    receipt_number: str
    number: DocumentNumber
    issued_at: datetime
    refund_reference: str
    currency: str
    merchant: MerchantSnapshot
    tax_regime: TaxRegime
    description: str
    amounts: Amounts


def credit_note_amounts(receipt: Receipt, credited_before: int, refund: Refund) -> Amounts:
    """The amounts of the credit note for `refund`, after `credited_before` was credited.

    Refused with FailedPrecondition when the refund does not belong to the receipt's user,
    is in another currency, or would credit more than the receipt's gross total.
    """
    amount = refund.amount_refunded
    metadata = {"receipt_number": receipt.number.text, "refund_reference": refund.refund_reference}
    if refund.user_id != receipt.user_id:
        raise FailedPrecondition(
            f"refund {refund.refund_reference} is for user {refund.user_id}, "
            f"receipt {receipt.number.text} for user {receipt.user_id}",
            reason="REFUND_USER_MISMATCH",
            metadata=metadata,
        )
    if amount.currency != receipt.currency:
        raise FailedPrecondition(
            f"refund in {amount.currency} of a receipt in {receipt.currency}",
            reason="REFUND_CURRENCY_MISMATCH",
            metadata=metadata,
        )
    totals = receipt.totals
    credited_after = credited_before + amount.amount_minor
    if credited_after > totals.gross:
        raise FailedPrecondition(
            f"refund of {amount.amount_minor} would credit {credited_after} of receipt "
            f"{receipt.number.text}, whose total is {totals.gross}",
            reason="CREDIT_EXCEEDS_RECEIPT",
            metadata=metadata,
        )
    tax = credited_tax(totals, credited_after) - credited_tax(totals, credited_before)
    return Amounts(net=amount.amount_minor - tax, tax=tax, gross=amount.amount_minor)


def new_credit_note(
    receipt: Receipt,
    refund: Refund,
    *,
    credited_before: int,
    merchant: MerchantSnapshot,
    credit_note_id: UUID,
    number: DocumentNumber,
    issued_at: datetime,
) -> CreditNote:
    if number.kind is not DocumentKind.CREDIT_NOTE:
        raise ValueError("a credit note needs a credit note number")
    products = ", ".join(line.description for line in receipt.lines)
    return CreditNote(
        credit_note_id=credit_note_id,
        merchant_id=receipt.merchant_id,
        user_id=receipt.user_id,
        order_id=receipt.order_id,
        receipt_id=receipt.receipt_id,
        receipt_number=receipt.number.text,
        number=number,
        issued_at=issued_at,
        refund_reference=refund.refund_reference,
        currency=receipt.currency,
        merchant=merchant,
        tax_regime=receipt.tax_regime,
        description=f"Refund: {products}",
        amounts=credit_note_amounts(receipt, credited_before, refund),
    )
