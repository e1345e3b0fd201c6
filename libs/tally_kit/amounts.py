"""Money and credits as exact values: the parsing and formatting every service shares.

Money is an integer number of minor units with an ISO-4217 currency; credits are exact
decimals with at most 6 fractional digits (stored as `numeric(20, 6)`). Text is accepted
only in plain decimal notation, never with an exponent, NaN or infinity, and no float
is ever involved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from tally_kit.errors import RuleViolation

CREDITS_FRACTION_DIGITS = 6
# numeric(20, 6): 14 integer digits.
MAX_CREDITS = Decimal("99999999999999.999999")

# Plain decimal notation only: digits, an optional fraction, an optional minus sign; never an
# exponent, a NaN or an infinity, which Decimal() would otherwise accept.
_DECIMAL_TEXT = re.compile(r"-?[0-9]{1,40}(\.[0-9]{1,40})?")

# Active ISO-4217 currencies in circulation (funds, metals and test codes left out).
ISO_4217_CURRENCIES = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN
    BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD
    FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY
    KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP
    MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR
    RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT
    TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR
    ZMW ZWG
    """.split()
)


@dataclass(frozen=True)
class Money:
    amount_minor: int
    currency: str


def parse_decimal(text: str, fraction_digits: int) -> Decimal:
    """An exact decimal in plain notation with at most `fraction_digits` fractional digits."""
    if not _DECIMAL_TEXT.fullmatch(text):
        raise RuleViolation('must be a decimal number in plain notation, such as "12.5"')
    value = Decimal(text)
    if value != value.quantize(Decimal(1).scaleb(-fraction_digits)):
        raise RuleViolation(f"must have at most {fraction_digits} fractional digits")
    return value


def parse_signed_credits(text: str) -> Decimal:
    """A number of credits of either sign (an adjustment, a balance): at most 6 fractional digits."""
    value = parse_decimal(text, CREDITS_FRACTION_DIGITS)
    if abs(value) > MAX_CREDITS:
        raise RuleViolation(f"must be at most {MAX_CREDITS} in absolute value")
    return value


def parse_credits(text: str) -> Decimal:
    """A positive number of credits: at most 6 fractional digits, no exponent."""
    value = parse_decimal(text, CREDITS_FRACTION_DIGITS)
    if value <= 0:
        raise RuleViolation("must be greater than 0")
    if value > MAX_CREDITS:
        raise RuleViolation(f"must be at most {MAX_CREDITS}")
    return value


def format_decimal(value: Decimal) -> str:
    """Plain notation without trailing zeros: Decimal("12.500000") -> "12.5"."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def check_currency(code: str) -> str:
    if code not in ISO_4217_CURRENCIES:
        raise RuleViolation("must be an ISO-4217 currency code in upper case, such as EUR")
    return code
