"""The receipt service's pure rules: tax and its rounding, numbers, credit notes, money text."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tally_kit.amounts import Money
from tally_kit.errors import FailedPrecondition
from tally_receipt import domain
from tally_receipt.domain import (
    Amounts,
    DocumentKind,
    DocumentNumber,
    MerchantProfile,
    MerchantSnapshot,
    PostalAddress,
    Purchase,
    Refund,
    TaxRegime,
)

T0 = datetime(2030, 3, 14, 9, 26, tzinfo=UTC)
MAX_MINOR = 2**63 - 1

# Tax rates as the catalog allows them: 0 to 100 percent with at most 4 fractional digits.
rates = st.integers(min_value=0, max_value=100_0000).map(lambda units: Decimal(units).scaleb(-4))
grosses = st.integers(min_value=0, max_value=10**15)


def inclusive(rate: str) -> TaxRegime:
    return TaxRegime(rate_percent=Decimal(rate), prices_include_tax=True)


def exclusive(rate: str) -> TaxRegime:
    return TaxRegime(rate_percent=Decimal(rate), prices_include_tax=False)


def checkout_total(listed_net: int, regime: TaxRegime) -> int:
    """What a checkout charges for a price that excludes tax: the price plus its tax, half up."""
    return listed_net + domain.round_half_up(listed_net * regime.rate)


# --- the rounding rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Fraction(0), 0),
        (Fraction(5, 2), 3),
        (Fraction(7, 2), 4),
        (Fraction(249, 100), 2),
        (Fraction(2501, 1000), 3),
        (Fraction(1, 2), 1),
        (Fraction(1, 3), 0),
    ],
)
def test_halves_round_up_never_to_even(value: Fraction, expected: int) -> None:
    assert domain.round_half_up(value) == expected


def test_rounding_refuses_negative_values() -> None:
    with pytest.raises(ValueError):
        domain.round_half_up(Fraction(-1, 2))


@pytest.mark.parametrize(
    ("gross", "rate", "net", "tax"),
    [
        # EUR 10.00 at 20 %: 1000 / 1.2 = 833.33...
        (1000, "20", 833, 167),
        # 0.03 at 20 %: 3 / 1.2 = 2.5 exactly, rounds up: no tax on the line.
        (3, "20", 3, 0),
        # 0.09 at 20 %: 7.5 rounds up to 8.
        (9, "20", 8, 1),
        # 4 at 60 %: 4 / 1.6 = 2.5 exactly, rounds up.
        (4, "60", 3, 1),
        # 5 at 100 %: 2.5 rounds up (to even would give 2).
        (5, "100", 3, 2),
        (1, "20", 1, 0),
        (0, "20", 0, 0),
        (1999, "0", 1999, 0),
        # 8.875 %: 1089 / 1.08875 = 1000.23
        (1089, "8.875", 1000, 89),
        # Four fractional digits of rate.
        (100000, "7.6543", 92890, 7110),
    ],
)
def test_tax_included_in_prices_is_extracted_per_line(gross: int, rate: str, net: int, tax: int) -> None:
    assert domain.split_gross(gross, inclusive(rate)) == Amounts(net=net, tax=tax, gross=gross)


@pytest.mark.parametrize(
    ("listed_net", "rate", "tax"),
    [
        # USD 10.00 + 8.875 % = 10.89 (88.75 rounds up to 89).
        (1000, "8.875", 89),
        # 0.05 + 10 % = 0.5 cent, rounds up: 0.06 charged.
        (5, "10", 1),
        # 0.15 + 10 % = 1.5 cents, rounds up.
        (15, "10", 2),
        # 0.04 + 12.5 % = 0.5 cent, rounds up.
        (4, "12.5", 1),
        (1, "20", 0),
        (2500, "0", 0),
        (1, "100", 1),
    ],
)
def test_tax_added_to_prices_shows_the_listed_price_and_its_tax(listed_net: int, rate: str, tax: int) -> None:
    regime = exclusive(rate)
    paid = checkout_total(listed_net, regime)
    assert paid == listed_net + tax
    assert domain.split_gross(paid, regime) == Amounts(net=listed_net, tax=tax, gross=paid)


@pytest.mark.parametrize(
    ("currency", "regime", "gross", "net", "tax"),
    [
        # JPY has no minor unit: amounts are whole yen.
        ("JPY", inclusive("10"), 1100, 1000, 100),
        ("JPY", inclusive("20"), 1000, 833, 167),
        # JPY 980 + 8 % = 78.4 yen, rounds down: 1058 charged.
        ("JPY", exclusive("8"), 1058, 980, 78),
        # BHD has 3 digits: 1.000 BHD at 10 % is 0.909 + 0.091.
        ("BHD", inclusive("10"), 1000, 909, 91),
        # KWD 2.345 + 5 % = 117.25 fils, rounds down: 2.462 KWD charged.
        ("KWD", exclusive("5"), 2462, 2345, 117),
        # KWD 0.010 + 5 % = 0.5 fils, rounds up.
        ("KWD", exclusive("5"), 11, 10, 1),
    ],
)
def test_currencies_with_zero_and_three_minor_digits(
    currency: str, regime: TaxRegime, gross: int, net: int, tax: int
) -> None:
    assert domain.minor_unit_digits(currency) in (0, 3)
    assert domain.split_gross(gross, regime) == Amounts(net=net, tax=tax, gross=gross)


@settings(max_examples=500)
@given(gross=grosses, rate=rates, include=st.booleans())
def test_net_plus_tax_is_the_gross_and_the_net_is_the_nearest_unit(
    gross: int, rate: Decimal, include: bool
) -> None:
    regime = TaxRegime(rate_percent=rate, prices_include_tax=include)
    amounts = domain.split_gross(gross, regime)
    assert amounts.net + amounts.tax == gross
    assert 0 <= amounts.tax <= gross
    exact_net = Fraction(gross) / (1 + regime.rate)
    assert abs(amounts.net - exact_net) <= Fraction(1, 2)
    # Half up: an exact half goes to the larger net.
    if exact_net - int(exact_net) == Fraction(1, 2):
        assert amounts.net == int(exact_net) + 1


@settings(max_examples=500)
@given(listed_net=grosses, rate=rates)
def test_a_price_excluding_tax_is_recovered_exactly_from_what_was_charged(
    listed_net: int, rate: Decimal
) -> None:
    regime = TaxRegime(rate_percent=rate, prices_include_tax=False)
    paid = checkout_total(listed_net, regime)
    amounts = domain.split_gross(paid, regime)
    assert amounts.net == listed_net
    assert amounts.tax == domain.round_half_up(listed_net * regime.rate)


@settings(max_examples=300)
@given(gross=grosses, rate=rates)
def test_tax_never_falls_as_the_gross_grows(gross: int, rate: Decimal) -> None:
    regime = inclusive(str(rate))
    before, after = domain.split_gross(gross, regime), domain.split_gross(gross + 1, regime)
    assert after.tax - before.tax in (0, 1)
    assert after.net - before.net in (0, 1)


def test_amounts_that_do_not_add_up_are_refused() -> None:
    with pytest.raises(ValueError):
        Amounts(net=800, tax=100, gross=1000)
    with pytest.raises(ValueError):
        Amounts(net=1100, tax=-100, gross=1000)


# --- money as text ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (123456, "EUR", "1,234.56 EUR"),
        (5, "EUR", "0.05 EUR"),
        (0, "USD", "0.00 USD"),
        (1235, "JPY", "1,235 JPY"),
        (1235, "KWD", "1.235 KWD"),
        (7, "BHD", "0.007 BHD"),
        (-1050, "EUR", "-10.50 EUR"),
        (MAX_MINOR, "EUR", "92,233,720,368,547,758.07 EUR"),
    ],
)
def test_money_is_formatted_from_minor_units(amount: int, currency: str, text: str) -> None:
    assert domain.format_money(amount, currency) == text


# --- numbers ------------------------------------------------------------------------------------


def test_receipt_and_credit_note_numbers() -> None:
    assert DocumentNumber(DocumentKind.RECEIPT, "ACME", 2030, 42).text == "ACME-2030-000042"
    assert DocumentNumber(DocumentKind.CREDIT_NOTE, "ACME", 2030, 7).text == "ACME-2030-CN000007"
    assert DocumentNumber(DocumentKind.RECEIPT, "A-1", 2030, 1_234_567).text == "A-1-2030-1234567"
    with pytest.raises(ValueError):
        DocumentNumber(DocumentKind.RECEIPT, "ACME", 2030, 0)


@given(
    receipt_series=st.from_regex(r"[A-Z0-9][A-Z0-9-]{0,15}", fullmatch=True),
    note_series=st.from_regex(r"[A-Z0-9][A-Z0-9-]{0,15}", fullmatch=True),
    year=st.integers(min_value=2000, max_value=2100),
    receipt_sequence=st.integers(min_value=1, max_value=10**8),
    note_sequence=st.integers(min_value=1, max_value=10**8),
)
def test_a_receipt_number_never_equals_a_credit_note_number(
    receipt_series: str, note_series: str, year: int, receipt_sequence: int, note_sequence: int
) -> None:
    receipt = DocumentNumber(DocumentKind.RECEIPT, receipt_series, year, receipt_sequence)
    note = DocumentNumber(DocumentKind.CREDIT_NOTE, note_series, year, note_sequence)
    assert receipt.text != note.text


def test_documents_are_numbered_in_their_utc_year() -> None:
    new_year_in_new_york = datetime(2030, 12, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert domain.numbering_year(new_year_in_new_york) == 2031
    assert domain.numbering_year(T0) == 2030
    with pytest.raises(ValueError):
        domain.numbering_year(datetime(2030, 1, 1))


# --- receipts -----------------------------------------------------------------------------------

MERCHANT = MerchantSnapshot(
    legal_name="Acme SAS",
    tax_id="FR40303265045",
    address=PostalAddress(("1 rue de la Paix",), "Paris", "", "75002", "FR"),
    config_revision=3,
)
PROFILE = MerchantProfile(merchant=MERCHANT, series_prefix="ACME", tax_regime=inclusive("20"))


def purchase(amount_minor: int = 1000, currency: str = "EUR") -> Purchase:
    return Purchase(
        merchant_id="acme",
        user_id="user-1",
        order_id="order-1",
        product_id=str(uuid4()),
        product_name="Starter pack",
        amount_paid=Money(amount_minor, currency),
        payment_id="",
        provider_reference="psp-1",
        lot_id=str(uuid4()),
        settled_at=T0,
    )


def receipt(amount_minor: int = 1000, regime: TaxRegime = PROFILE.tax_regime) -> domain.Receipt:
    profile = dataclasses.replace(PROFILE, tax_regime=regime)
    return domain.new_receipt(
        purchase(amount_minor),
        profile,
        receipt_id=uuid4(),
        number=DocumentNumber(DocumentKind.RECEIPT, "ACME", 2030, 1),
        issued_at=T0,
    )


def test_a_receipt_has_one_line_per_order_and_snapshots_the_merchant() -> None:
    issued = receipt(1000)
    assert [line.description for line in issued.lines] == ["Starter pack"]
    assert issued.totals == Amounts(net=833, tax=167, gross=1000)
    assert issued.merchant == MERCHANT
    assert issued.tax_regime == PROFILE.tax_regime
    assert issued.number.text == "ACME-2030-000001"


def test_an_order_that_paid_nothing_needs_no_receipt() -> None:
    assert not domain.needs_receipt(purchase(0))
    assert domain.needs_receipt(purchase(1))
    with pytest.raises(ValueError):
        receipt(0)


# --- credit notes -------------------------------------------------------------------------------


def refund(amount_minor: int, reference: str = "refund-1", **changes: object) -> Refund:
    value = Refund(
        merchant_id="acme",
        user_id="user-1",
        order_id="order-1",
        refund_reference=reference,
        amount_refunded=Money(amount_minor, "EUR"),
    )
    return dataclasses.replace(value, **changes)


def test_a_full_refund_credits_the_receipt_exactly() -> None:
    issued = receipt(1000)
    assert domain.credit_note_amounts(issued, 0, refund(1000)) == issued.totals


def test_partial_refunds_reverse_the_tax_in_proportion_and_add_up_to_it() -> None:
    issued = receipt(1000)  # tax 167
    first = domain.credit_note_amounts(issued, 0, refund(333))
    second = domain.credit_note_amounts(issued, 333, refund(333))
    third = domain.credit_note_amounts(issued, 666, refund(334))
    # 167 * 333 / 1000 = 55.611 -> 56; 167 * 666 / 1000 = 111.222 -> 111; then 167.
    assert [first.tax, second.tax, third.tax] == [56, 55, 56]
    assert first + second + third == issued.totals


def test_a_refund_beyond_the_receipt_is_refused() -> None:
    issued = receipt(1000)
    with pytest.raises(FailedPrecondition) as refused:
        domain.credit_note_amounts(issued, 600, refund(401))
    assert refused.value.reason == "CREDIT_EXCEEDS_RECEIPT"


def test_a_refund_in_another_currency_or_of_another_user_is_refused() -> None:
    issued = receipt(1000)
    with pytest.raises(FailedPrecondition) as currency:
        domain.credit_note_amounts(issued, 0, refund(100, amount_refunded=Money(100, "USD")))
    assert currency.value.reason == "REFUND_CURRENCY_MISMATCH"
    with pytest.raises(FailedPrecondition) as user:
        domain.credit_note_amounts(issued, 0, refund(100, user_id="someone-else"))
    assert user.value.reason == "REFUND_USER_MISMATCH"


def test_a_credit_note_refers_to_its_receipt_and_keeps_its_tax_regime() -> None:
    issued = receipt(1000)
    newer_merchant = dataclasses.replace(MERCHANT, legal_name="Acme Group SAS", config_revision=4)
    note = domain.new_credit_note(
        issued,
        refund(250),
        credited_before=0,
        merchant=newer_merchant,
        credit_note_id=uuid4(),
        number=DocumentNumber(DocumentKind.CREDIT_NOTE, "ACME", 2030, 1),
        issued_at=T0 + timedelta(days=1),
    )
    assert (note.receipt_id, note.receipt_number) == (issued.receipt_id, "ACME-2030-000001")
    assert note.tax_regime == issued.tax_regime
    assert note.merchant == newer_merchant
    assert note.amounts == Amounts(net=208, tax=42, gross=250)
    assert note.description == "Refund: Starter pack"


@settings(max_examples=300, deadline=None)
@given(
    gross=st.integers(min_value=1, max_value=10**12),
    rate=rates,
    include=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=10**12), min_size=1, max_size=8),
)
def test_credit_notes_never_credit_more_tax_than_the_receipt_and_all_of_it_at_the_end(
    gross: int, rate: Decimal, include: bool, cuts: list[int]
) -> None:
    issued = receipt(gross, TaxRegime(rate_percent=rate, prices_include_tax=include))
    # Refunds that use up the receipt: each cut takes at most what is left, the last the rest.
    refunds: list[int] = []
    left = gross
    for cut in cuts:
        if left == 0:
            break
        amount = min(cut, left)
        refunds.append(amount)
        left -= amount
    if left:
        refunds.append(left)
    credited = Amounts(0, 0, 0)
    for index, amount in enumerate(refunds):
        note = domain.credit_note_amounts(issued, credited.gross, refund(amount, f"refund-{index}"))
        assert 0 <= note.tax <= note.gross == amount
        credited += note
    assert credited == issued.totals
