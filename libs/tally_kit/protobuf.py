"""The kit's values as the protobuf messages every service's API shares, and back.

Times are aware UTC datetimes (`google.protobuf.Timestamp`), money is `tally_kit.amounts.Money`
(`tally.common.v1.Money`, integer minor units), credits are exact decimals
(`tally.common.v1.Credits`, a decimal string).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from tally.common.v1 import money_pb2

from tally_kit.amounts import Money, format_decimal


def to_datetime(value: Timestamp) -> datetime | None:
    """An aware UTC datetime (microseconds; finer digits are dropped), or None if out of range."""
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


def timestamp(value: datetime) -> Timestamp:
    message = Timestamp()
    message.FromDatetime(value)
    return message


def duration(value: timedelta) -> Duration:
    message = Duration()
    message.FromTimedelta(value)
    return message


def money(value: Money) -> money_pb2.Money:
    return money_pb2.Money(amount_minor=value.amount_minor, currency=value.currency)


def credits(value: Decimal) -> money_pb2.Credits:
    return money_pb2.Credits(value=format_decimal(value))
