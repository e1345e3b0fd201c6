"""The transactional outbox: events are written in the transaction of the change they announce."""

from __future__ import annotations

import uuid

import asyncpg
from google.protobuf.message import Message

from tally_kit.events.envelope import make_envelope


async def enqueue(
    conn: asyncpg.Connection,
    *,
    producer: str,
    event_type: str,
    merchant_id: str,
    payload: Message,
) -> str:
    """Write the event into `outbox` inside the caller's transaction; return its event id.

    The event is published only if that transaction commits. After the commit the caller
    calls `OutboxRelay.notify(merchant_id)` so it is published right away.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("enqueue must run inside the transaction of the change it announces")
    envelope = make_envelope(
        event_type=event_type, merchant_id=merchant_id, payload=payload, producer=producer
    )
    await conn.execute(
        "INSERT INTO outbox (event_id, event_type, merchant_id, envelope) VALUES ($1, $2, $3, $4)",
        uuid.UUID(envelope.event_id),
        event_type,
        merchant_id,
        envelope.SerializeToString(),
    )
    return envelope.event_id
