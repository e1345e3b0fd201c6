"""The JSON log formatter."""

from __future__ import annotations

import calendar
import json
import logging
import re
from datetime import datetime
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st
from tally_kit import context
from tally_kit.logging import JsonFormatter


def record_at(created: float, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "tally.test", "levelno": logging.INFO, "levelname": "INFO"})
    record.msg = "lot %s issued"
    record.args = ("L1",)
    record.created = created
    record.__dict__.update(extra)
    return record


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_timestamps_are_utc_iso_8601_truncated_to_the_millisecond(created: float) -> None:
    stamp = json.loads(JsonFormatter("test").format(record_at(created)))["ts"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", stamp)
    parsed = datetime.fromisoformat(stamp)
    instant = calendar.timegm(parsed.utctimetuple()) + Decimal(parsed.microsecond) / 1_000_000
    # Truncated, not rounded: never later than the record (but for the float's last bit).
    assert Decimal(created) - Decimal("0.001") < instant <= Decimal(created) + Decimal("0.000001")


def test_consecutive_records_in_and_across_seconds_keep_their_own_time() -> None:
    formatter = JsonFormatter("test")
    stamps = [json.loads(formatter.format(record_at(t)))["ts"] for t in (1000.25, 1000.5, 1001.0, 999.999)]
    assert stamps == [
        "1970-01-01T00:16:40.250+00:00",
        "1970-01-01T00:16:40.500+00:00",
        "1970-01-01T00:16:41.000+00:00",
        "1970-01-01T00:16:39.999+00:00",
    ]


def test_a_line_carries_the_call_context_and_the_extras() -> None:
    formatter = JsonFormatter("catalog")
    correlation = context.correlation_id.set("req-1")
    merchant = context.merchant_id.set("acme")
    try:
        line = json.loads(formatter.format(record_at(1000.0, credits=Decimal("1.50"), lot_id="L1")))
    finally:
        context.correlation_id.reset(correlation)
        context.merchant_id.reset(merchant)
    assert line == {
        "ts": "1970-01-01T00:16:40.000+00:00",
        "level": "INFO",
        "service": "catalog",
        "logger": "tally.test",
        "message": "lot L1 issued",
        "correlation_id": "req-1",
        "merchant_id": "acme",
        "credits": "1.50",
        "lot_id": "L1",
    }
