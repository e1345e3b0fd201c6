"""Exact credits and currencies, shared by every service (with hypothesis)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tally_kit import amounts
from tally_kit.errors import RuleViolation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", Decimal(1)),
        ("0.000001", Decimal("0.000001")),
        ("12.5", Decimal("12.5")),
        ("7.500000", Decimal("7.5")),
    ],
)
def test_credits_accept_positive_decimals_with_at_most_six_fractional_digits(
    text: str, expected: Decimal
) -> None:
    assert amounts.parse_credits(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("0", "greater than 0"),
        ("-1", "greater than 0"),
        ("0.0000001", "at most 6 fractional digits"),
        ("1e3", "plain notation"),
        ("NaN", "plain notation"),
        ("Infinity", "plain notation"),
        ("", "plain notation"),
        (" 1", "plain notation"),
        ("1.", "plain notation"),
        (".5", "plain notation"),
        ("1\n", "plain notation"),
        ("100000000000000", "at most"),
    ],
)
def test_credits_refuse_what_is_not_an_exact_positive_amount(text: str, complaint: str) -> None:
    with pytest.raises(RuleViolation, match=complaint):
        amounts.parse_credits(text)


@given(st.decimals(min_value=Decimal("0.000001"), max_value=amounts.MAX_CREDITS, places=6))
def test_credits_survive_formatting_and_parsing(value: Decimal) -> None:
    text = amounts.format_decimal(value)
    assert "E" not in text and "e" not in text
    assert amounts.parse_credits(text) == value


@pytest.mark.parametrize(
    ("value", "text"), [(Decimal("12.500000"), "12.5"), (Decimal("100.000000"), "100"), (Decimal("0"), "0")]
)
def test_decimals_are_formatted_without_trailing_zeros(value: Decimal, text: str) -> None:
    assert amounts.format_decimal(value) == text


def test_currencies_must_be_iso_4217_codes() -> None:
    assert amounts.check_currency("EUR") == "EUR"
    for bad in ("eur", "EURO", "XYZ", "", "XAU"):
        with pytest.raises(RuleViolation, match="ISO-4217"):
            amounts.check_currency(bad)


@pytest.mark.parametrize(
    ("text", "expected"), [("-12.5", Decimal("-12.5")), ("0", Decimal(0)), ("3", Decimal(3))]
)
def test_signed_credits_accept_either_sign(text: str, expected: Decimal) -> None:
    assert amounts.parse_signed_credits(text) == expected


def test_signed_credits_refuse_more_than_six_fractional_digits_or_too_large() -> None:
    for bad in ("-0.0000001", "-100000000000000", "1e2"):
        with pytest.raises(RuleViolation):
            amounts.parse_signed_credits(bad)
