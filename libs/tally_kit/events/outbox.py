"""The transactional outbox: events are written in the transaction of the change they announce."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
from google.protobuf.message import Message

from tally_kit.events.envelope import make_envelope


@dataclass(frozen=True)
class OutboxRow:
    """One event as the outbox keeps it (its merchant is the transaction's)."""

    event_id: uuid.UUID
    event_type: str
    # The serialized tally.common.v1.EventEnvelope, published as is.
    envelope: bytes


def outbox_row(*, producer: str, event_type: str, merchant_id: str, payload: Message) -> OutboxRow:
    """The event wrapped in a new envelope (fresh event id, stamped now), ready to be written."""
    envelope = make_envelope(
        event_type=event_type, merchant_id=merchant_id, payload=payload, producer=producer
    )
    return OutboxRow(uuid.UUID(envelope.event_id), event_type, envelope.SerializeToString())


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
    row = outbox_row(producer=producer, event_type=event_type, merchant_id=merchant_id, payload=payload)
    await conn.execute(
        "INSERT INTO outbox (event_id, event_type, merchant_id, envelope) VALUES ($1, $2, $3, $4)",
        row.event_id,
        event_type,
        merchant_id,
        row.envelope,
    )
    return str(row.event_id)
