"""The unit of work a servicer runs a mutation in.

One merchant transaction holds the effect, its idempotency key and the events it
publishes (outbox rows), so either all of them happen or none does. After commit the
outbox relay is told to publish right away; its periodic sweep is only the safety net.

The key is recorded after the effect, with the response, in the same statement that writes
the events the effect published: a mutation costs BEGIN, the effect's own statements, that
one statement and COMMIT. The key's primary key keeps one effect per key: when another
request recorded it first (committed before, or while this transaction waited on its row),
this transaction rolls back and the stored response is returned (a different payload is
refused with IDEMPOTENCY_KEY_REUSED). A repeat therefore runs its effect again before it is
rolled back, and one whose effect now fails (its work was done by the first) is answered
the same way: whenever the effect fails, a recorded key's response (or refusal) stands in
for the failure.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import asyncpg
from google.protobuf.message import Message

from tally_kit import idempotency
from tally_kit.db.directory import MerchantDirectory
from tally_kit.errors import AlreadyExists
from tally_kit.events.outbox import OutboxRow, enqueue, outbox_row

R = TypeVar("R", bound=Message)

log = logging.getLogger(__name__)

# The key with its response, and the effect's events in the order published (ids follow it).
_RECORD = """
WITH recorded AS (
    INSERT INTO idempotency_keys (request_id, operation, fingerprint, response)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING true
), published AS (
    INSERT INTO outbox (event_id, event_type, merchant_id, envelope)
    SELECT e.event_id, e.event_type, $5, e.envelope
      FROM unnest($6::uuid[], $7::text[], $8::bytea[])
           WITH ORDINALITY AS e(event_id, event_type, envelope, position)
     ORDER BY e.position
)
SELECT EXISTS (SELECT FROM recorded)
"""


class RelayNotifier(Protocol):
    def notify(self, merchant_id: str) -> None: ...


class Transaction:
    """What an effect sees: the connection inside the transaction and a way to publish."""

    def __init__(self, conn: asyncpg.Connection, *, merchant_id: str, producer: str) -> None:
        self.conn = conn
        self._merchant_id = merchant_id
        self._producer = producer
        self.published = 0

    async def publish(self, event_type: str, payload: Message) -> None:
        await enqueue(
            self.conn,
            producer=self._producer,
            event_type=event_type,
            merchant_id=self._merchant_id,
            payload=payload,
        )
        self.published += 1


class _MutationTransaction(Transaction):
    """Keeps the events published until `Mutations` writes them with the key, in one statement:
    an effect never reads its own events back."""

    def __init__(self, conn: asyncpg.Connection, *, merchant_id: str, producer: str) -> None:
        super().__init__(conn, merchant_id=merchant_id, producer=producer)
        self.events: list[OutboxRow] = []

    async def publish(self, event_type: str, payload: Message) -> None:
        self.events.append(
            outbox_row(
                producer=self._producer, event_type=event_type, merchant_id=self._merchant_id, payload=payload
            )
        )
        self.published += 1


class _RecordedFirst(Exception):
    """Another request recorded the key first: this transaction rolls back."""


class Mutations:
    def __init__(self, directory: MerchantDirectory, relay: RelayNotifier, *, producer: str) -> None:
        self._directory = directory
        self._relay = relay
        self._producer = producer

    async def run(
        self,
        merchant_id: str,
        *,
        operation: str,
        request: Message,
        response_type: type[R],
        effect: Callable[[Transaction], Awaitable[R]],
    ) -> R:
        request_id: str = request.request_id  # type: ignore[attr-defined]
        request_fingerprint = idempotency.fingerprint(operation, request)
        try:
            async with self._directory.transaction(merchant_id) as conn:
                tx = _MutationTransaction(conn, merchant_id=merchant_id, producer=self._producer)
                response = await effect(tx)
                recorded = await conn.fetchval(
                    _RECORD,
                    request_id,
                    operation,
                    request_fingerprint,
                    response.SerializeToString(deterministic=True),
                    merchant_id,
                    [event.event_id for event in tx.events],
                    [event.event_type for event in tx.events],
                    [event.envelope for event in tx.events],
                )
                if not recorded:
                    raise _RecordedFirst
        except _RecordedFirst:
            stored = await self._stored(merchant_id, request_id, request_fingerprint, response_type)
            if stored is None:
                raise RuntimeError(
                    f"request_id '{request_id}' conflicted, yet no request recorded it"
                ) from None
            return stored
        except Exception:
            stored = await self._stored_instead_of_failure(
                merchant_id, request_id, request_fingerprint, response_type
            )
            if stored is None:
                raise
            return stored
        if tx.published:
            self._relay.notify(merchant_id)
        return response

    async def _stored(
        self, merchant_id: str, request_id: str, request_fingerprint: str, response_type: type[R]
    ) -> R | None:
        async with self._directory.connection(merchant_id) as conn:
            return await idempotency.stored_response(
                conn,
                request_id=request_id,
                request_fingerprint=request_fingerprint,
                response_type=response_type,
            )

    async def _stored_instead_of_failure(
        self, merchant_id: str, request_id: str, request_fingerprint: str, response_type: type[R]
    ) -> R | None:
        """The recorded key's response when the effect failed; None when the key is not recorded
        (the failure stands), or cannot be looked up (the failure stands, and it is logged)."""
        try:
            return await self._stored(merchant_id, request_id, request_fingerprint, response_type)
        except AlreadyExists:
            raise
        except Exception:
            log.warning(
                "looking up request_id %r after its effect failed failed too", request_id, exc_info=True
            )
            return None
