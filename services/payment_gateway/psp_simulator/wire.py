"""JSON as Authorize.Net writes it: amounts as exact numbers, answers after a byte order mark."""

from __future__ import annotations

import json
from decimal import Decimal

BYTE_ORDER_MARK = "\ufeff"


def render_json(value: object) -> str:
    """Compact JSON in which a Decimal is written as the number it is, never through a float."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return (
            "{" + ",".join(f"{json.dumps(str(key))}:{render_json(item)}" for key, item in value.items()) + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(render_json(item) for item in value) + "]"
    return json.dumps(value)
