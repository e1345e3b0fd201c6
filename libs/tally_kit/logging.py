"""JSON log lines on stdout, each carrying the call's correlation id and merchant.

The standard `logging` module stays underneath: code logs with `logging.getLogger(__name__)`
and passes structured fields through `extra`, e.g.
`log.info("lot issued", extra={"lot_id": lot_id})`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from tally_kit import context

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# default=str: an extra that JSON cannot encode (a Decimal, a UUID) is logged as its text.
# One encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, service, logger, message, call context, extras.

    It runs for every access log line, so the timestamp's text up to the second is kept
    from one record to the next.
    """

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service
        # (epoch second, its text): one attribute, so a formatter shared by handlers in
        # several threads never pairs a second with another second's text.
        self._last_second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if correlation_id := context.correlation_id.get():
            entry["correlation_id"] = correlation_id
        if merchant_id := context.merchant_id.get():
            entry["merchant_id"] = merchant_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD_RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        return _ENCODER.encode(entry)

    def _timestamp(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond (truncated), e.g. `2025-01-31T12:00:00.123+00:00`."""
        second = int(created)
        cached_second, text = self._last_second
        if second != cached_second:
            text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._last_second = (second, text)
        return f"{text}.{int((created - second) * 1000):03d}+00:00"


def configure_logging(service: str, level: str) -> None:
    """Send every log record of the process to stdout as JSON lines, at `level` and above."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
