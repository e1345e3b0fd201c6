"""AIP-155 idempotency: a mutating request's `request_id`, kept in the merchant database.

The key is inserted in the transaction that performs the request's effect, before the
effect, and the response is stored in the same transaction after it. So either the
effect and its key commit together or neither does, and a concurrent request with the
same key waits on the key's row until the first transaction ends: it then finds the
stored response (commit) or reserves the key itself (rollback). One key, one effect.

A repeat with the same operation and payload gets the first response; with a different
payload or operation it is refused with ALREADY_EXISTS, reason IDEMPOTENCY_KEY_REUSED.

`begin`/`finish` reserve the key before the effect. `tally_kit.uow.Mutations` records it
after the effect instead, with its response in one statement (see there); both keep the
key and the effect in one transaction, and `stored_response` answers repeats for both.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from google.protobuf.message import Message

from tally_kit.errors import AlreadyExists, Violations

M = TypeVar("M", bound=Message)

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no whitespace
_REQUEST_ID_FIELD = "request_id"


def validate_request_id(violations: Violations, value: str, field: str = _REQUEST_ID_FIELD) -> None:
    if not value:
        violations.add(field, "is required")
    elif _REQUEST_ID.fullmatch(value) is None:
        violations.add(field, "must be 1 to 128 printable ASCII characters without whitespace")


def fingerprint(operation: str, request: Message) -> str:
    """sha256 over the operation and the request's deterministic serialization without its request_id."""
    payload = type(request)()
    payload.CopyFrom(request)
    if _REQUEST_ID_FIELD in payload.DESCRIPTOR.fields_by_name:
        payload.ClearField(_REQUEST_ID_FIELD)
    digest = hashlib.sha256(operation.encode())
    digest.update(b"\0")  # the operation name cannot run into the payload
    digest.update(payload.SerializeToString(deterministic=True))
    return digest.hexdigest()


async def begin(
    conn: asyncpg.Connection,
    *,
    operation: str,
    request_id: str,
    request: Message,
    response_type: type[M],
) -> M | None:
    """Reserves the key in the caller's transaction, before the effect.

    Returns None when this call reserved it (perform the effect, then `finish`), or the
    stored response of the request that used the key first.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("idempotency.begin must run inside the transaction of the effect")
    request_fingerprint = fingerprint(operation, request)
    reserved = await conn.fetchval(
        """
        INSERT INTO idempotency_keys (request_id, operation, fingerprint)
        VALUES ($1, $2, $3)
        ON CONFLICT (request_id) DO NOTHING
        RETURNING true
        """,
        request_id,
        operation,
        request_fingerprint,
    )
    if reserved:
        return None
    stored = await stored_response(
        conn, request_id=request_id, request_fingerprint=request_fingerprint, response_type=response_type
    )
    if stored is None:
        raise RuntimeError(f"request_id '{request_id}' conflicted, yet no request recorded it")
    return stored


async def stored_response(
    conn: asyncpg.Connection, *, request_id: str, request_fingerprint: str, response_type: type[M]
) -> M | None:
    """The response of the request that recorded the key (committed, or reserved earlier in the
    caller's own transaction); None when none did. A key recorded for another payload or
    operation is refused with ALREADY_EXISTS, reason IDEMPOTENCY_KEY_REUSED."""
    stored = await conn.fetchrow(
        "SELECT fingerprint, response FROM idempotency_keys WHERE request_id = $1", request_id
    )
    if stored is None:
        return None
    if stored["fingerprint"] != request_fingerprint:
        raise AlreadyExists(
            f"request_id '{request_id}' was used for a different request", reason="IDEMPOTENCY_KEY_REUSED"
        )
    if stored["response"] is None:
        raise RuntimeError(f"request_id '{request_id}' was reserved in this transaction without a response")
    return response_type.FromString(stored["response"])


async def finish(conn: asyncpg.Connection, *, request_id: str, response: Message) -> None:
    """Stores the response of the effect, in the transaction `begin` reserved the key in."""
    status = await conn.execute(
        "UPDATE idempotency_keys SET response = $2 WHERE request_id = $1 AND response IS NULL",
        request_id,
        response.SerializeToString(deterministic=True),
    )
    if status != "UPDATE 1":
        raise RuntimeError(f"request_id '{request_id}' is not reserved by this transaction")


async def run_once(
    conn: asyncpg.Connection,
    *,
    operation: str,
    request_id: str,
    request: Message,
    response_type: type[M],
    effect: Callable[[], Awaitable[M]],
) -> M:
    """Runs `effect` once per request_id, inside the caller's transaction; a repeat gets its response."""
    stored = await begin(
        conn, operation=operation, request_id=request_id, request=request, response_type=response_type
    )
    if stored is not None:
        return stored
    response = await effect()
    await finish(conn, request_id=request_id, response=response)
    return response
