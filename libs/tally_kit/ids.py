"""Identifiers every service checks the same way."""

from __future__ import annotations

import re

# A merchant id also names the merchant's databases: lower case, short, no underscore.
MERCHANT_ID_PATTERN = re.compile(r"^[a-z][a-z0-9-]{2,31}$")


def is_valid_merchant_id(value: str) -> bool:
    return MERCHANT_ID_PATTERN.fullmatch(value) is not None
