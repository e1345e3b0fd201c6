"""Checks for free text that reaches receipts, logs and other systems."""

from __future__ import annotations

import re

from tally_kit.errors import RuleViolation

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def check_text(value: str, max_length: int) -> str:
    """Required, at most `max_length` characters, no control characters."""
    if not value.strip():
        raise RuleViolation("is required")
    if len(value) > max_length:
        raise RuleViolation(f"must be at most {max_length} characters")
    if _CONTROL_CHARACTERS.search(value):
        raise RuleViolation("must not contain control characters")
    return value
