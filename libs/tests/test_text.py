"""Free-text checks shared by every service."""

from __future__ import annotations

import pytest
from tally_kit.errors import RuleViolation
from tally_kit.text import check_text


def test_text_must_be_present_bounded_and_printable() -> None:
    assert check_text("Acme SAS", 10) == "Acme SAS"
    for bad, complaint in (("   ", "required"), ("x" * 11, "at most 10"), ("a\tb", "control")):
        with pytest.raises(RuleViolation, match=complaint):
            check_text(bad, 10)
