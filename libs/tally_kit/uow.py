"""The unit of work a servicer runs a mutation in.

One merchant transaction holds the effect, its idempotency key and the events it
publishes (outbox rows), so either all of them happen or none does. After commit the
outbox relay is told to publish right away; its periodic sweep is only the safety net.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import asyncpg
from google.protobuf.message import Message

from tally_kit import idempotency
from tally_kit.db.directory import MerchantDirectory
from tally_kit.events.outbox import enqueue

R = TypeVar("R", bound=Message)


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
        async with self._directory.transaction(merchant_id) as conn:
            replayed = await idempotency.begin(
                conn,
                operation=operation,
                request_id=request_id,
                request=request,
                response_type=response_type,
            )
            if replayed is not None:
                return replayed
            tx = Transaction(conn, merchant_id=merchant_id, producer=self._producer)
            response = await effect(tx)
            await idempotency.finish(conn, request_id=request_id, response=response)
        if tx.published:
            self._relay.notify(merchant_id)
        return response
