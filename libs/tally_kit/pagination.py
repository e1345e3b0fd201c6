"""AIP-158 pagination: page sizes, and keyset page tokens bound to the filters they came from.

A page token is opaque to callers: URL-safe base64 of the last key of the page it follows
and a digest of the list's scope (which list, which merchant, which filters). A token
presented with another scope is refused, because the key it carries would mean nothing
there. Tokens are not secret: forging one only moves the start of a page inside the
caller's own list.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar
from uuid import UUID

from tally_kit.errors import Violations

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

KeyPart = str | int | UUID | datetime
KeyKind = type[str] | type[int] | type[UUID] | type[datetime]
T = TypeVar("T")


@dataclass(frozen=True)
class PageRequest:
    size: int
    # The last key of the previous page; None for the first page.
    after: tuple[KeyPart, ...] | None
    scope: str

    def token_after(self, key: Sequence[KeyPart]) -> str:
        """The token of the page that follows the row with this key."""
        payload = {"k": [_encode_part(part) for part in key], "s": self.scope}
        raw = json.dumps(payload, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    # Empty on the last page.
    next_page_token: str


def read_page_request(
    violations: Violations,
    *,
    page_size: int,
    page_token: str,
    scope: Mapping[str, str],
    key: Sequence[KeyKind],
) -> PageRequest:
    """The page asked for; bad sizes and tokens are added to `violations`.

    `scope` names the list and every filter applied to it; `key` gives the kinds of the
    list's sort key, in order.
    """
    violations.require(page_size >= 0, "page_size", "must not be negative")
    size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
    digest = _scope_digest(scope)
    after = None
    if page_token:
        try:
            after = _decode(page_token, digest, key)
        except ValueError as error:
            violations.add("page_token", str(error))
    return PageRequest(size=size, after=after, scope=digest)


def page_of(rows: Sequence[T], request: PageRequest, key_of: Callable[[T], Sequence[KeyPart]]) -> Page[T]:
    """Cuts `rows` (fetched with LIMIT size + 1) into a page and the token of the next one."""
    if len(rows) <= request.size:
        return Page(items=list(rows), next_page_token="")
    items = list(rows[: request.size])
    return Page(items=items, next_page_token=request.token_after(key_of(items[-1])))


def _scope_digest(scope: Mapping[str, str]) -> str:
    canonical = json.dumps(sorted(scope.items()), separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def _decode(token: str, digest: str, kinds: Sequence[KeyKind]) -> tuple[KeyPart, ...]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError) as error:
        raise ValueError("is not a page token this list issued") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("k"), list):
        raise ValueError("is not a page token this list issued")
    if payload.get("s") != digest:
        raise ValueError("was issued for a different list or different filters")
    parts = payload["k"]
    if len(parts) != len(kinds) or not all(isinstance(part, str) for part in parts):
        raise ValueError("is not a page token this list issued")
    try:
        return tuple(_decode_part(part, kind) for part, kind in zip(parts, kinds, strict=True))
    except ValueError as error:
        raise ValueError("is not a page token this list issued") from error


def _encode_part(part: KeyPart) -> str:
    return part.isoformat() if isinstance(part, datetime) else str(part)


def _decode_part(text: str, kind: KeyKind) -> KeyPart:
    if kind is datetime:
        value = datetime.fromisoformat(text)
        if value.tzinfo is None:
            raise ValueError("timestamp without a time zone")
        return value
    if kind is UUID:
        return UUID(text)
    if kind is int:
        return int(text)
    return text
