"""AIP-158 page sizes and page tokens bound to the list and filters they were issued for."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tally_kit.errors import InvalidArgument, Violations
from tally_kit.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageRequest, page_of, read_page_request

SCOPE = {"list": "products", "merchant_id": "acme", "show_archived": "False"}
KEY = (datetime, UUID)


def _read(page_size: int = 0, page_token: str = "", scope: dict[str, str] = SCOPE) -> PageRequest:
    violations = Violations()
    page = read_page_request(violations, page_size=page_size, page_token=page_token, scope=scope, key=KEY)
    violations.raise_if_any()
    return page


def _refusal(**kwargs: object) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as refused:
        _read(**kwargs)  # type: ignore[arg-type]
    return [(v.field, v.description) for v in refused.value.violations]


def test_sizes_default_and_are_capped() -> None:
    assert _read(0).size == DEFAULT_PAGE_SIZE
    assert _read(7).size == 7
    assert _read(MAX_PAGE_SIZE + 1).size == MAX_PAGE_SIZE


def test_a_negative_size_is_refused() -> None:
    assert _refusal(page_size=-1) == [("page_size", "must not be negative")]


@given(st.datetimes(timezones=st.just(UTC)), st.uuids())
def test_a_token_carries_the_last_key_to_the_next_page(created_at: datetime, product_id: UUID) -> None:
    token = _read().token_after((created_at, product_id))
    assert _read(page_token=token).after == (created_at, product_id)


def test_a_token_is_refused_with_other_filters() -> None:
    token = _read().token_after((datetime.now(UTC), uuid4()))
    [(field, description)] = _refusal(page_token=token, scope={**SCOPE, "show_archived": "True"})
    assert field == "page_token" and "different list or different filters" in description


@pytest.mark.parametrize(
    "token",
    [
        "not base64 at all!",
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b"{").decode(),
    ],
)
def test_garbage_tokens_are_refused(token: str) -> None:
    assert [field for field, _ in _refusal(page_token=token)] == ["page_token"]


def test_a_token_with_a_malformed_key_is_refused() -> None:
    scope_digest = _read().scope
    for key in (["yesterday", str(uuid4())], ["2030-01-01T00:00:00", str(uuid4())], ["x"]):
        token = base64.urlsafe_b64encode(json.dumps({"k": key, "s": scope_digest}).encode()).decode()
        assert [field for field, _ in _refusal(page_token=token)] == ["page_token"]


def test_a_page_holds_at_most_size_items_and_a_token_only_when_more_follow() -> None:
    page = _read(2)
    rows = [(datetime(2030, 1, day, tzinfo=UTC), uuid4()) for day in (1, 2, 3)]
    full = page_of(rows, page, lambda row: row)
    assert full.items == rows[:2]
    assert _read(2, full.next_page_token).after == rows[1]
    last = page_of(rows[:2], page, lambda row: row)
    assert last.items == rows[:2] and last.next_page_token == ""
