"""`Violations`: the bad fields of one request, gathered and refused together."""

from __future__ import annotations

import pytest
from tally_kit.errors import InvalidArgument, Violations


@pytest.mark.parametrize(
    ("value", "description"),
    [
        ("", "is required"),
        ("Acme", "must match ^[a-z][a-z0-9-]{2,31}$"),
        ("ac", "must match ^[a-z][a-z0-9-]{2,31}$"),
        ("acme_shop", "must match ^[a-z][a-z0-9-]{2,31}$"),
    ],
)
def test_a_bad_merchant_id_is_named_with_what_is_wrong(value: str, description: str) -> None:
    violations = Violations()
    assert violations.merchant_id(value) is False
    with pytest.raises(InvalidArgument) as refused:
        violations.raise_if_any()
    assert [(v.field, v.description) for v in refused.value.violations] == [("merchant_id", description)]


def test_a_good_merchant_id_records_nothing() -> None:
    violations = Violations()
    assert violations.merchant_id("acme-shop-2") is True
    assert not violations
    violations.raise_if_any()
