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


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, service, logger, message, call context, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
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
        # default=str: an extra that JSON cannot encode (a Decimal, a UUID) is logged as its text.
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(service: str, level: str) -> None:
    """Send every log record of the process to stdout as JSON lines, at `level` and above."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
