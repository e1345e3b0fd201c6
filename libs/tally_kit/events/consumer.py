"""The event consumer: one durable quorum queue per service, handlers run in merchant transactions.

For each delivery the kit decodes the envelope, unpacks the payload to its own message
type, and calls the handler for its event type inside a transaction on the event's
merchant database. The same transaction records the event id in `inbox`; an event found
there already is a redelivery, acknowledged without running the handler again. The
message is acknowledged only after the commit, so a crash in between redelivers it and
the inbox absorbs the duplicate.

Failures:
- transient (PostgreSQL connection loss or overload, serialization failure or deadlock,
  timeouts, `Unavailable`, `Aborted`): wait with exponential backoff, then requeue; the
  queue counts deliveries;
- poison (undecodable envelope, no handler, a payload type whose generated module the
  process has not imported, any other `TallyError`): rejected without requeue, so
  RabbitMQ dead-letters it to the service's parking queue; logged and counted, never
  dropped, and the next messages keep flowing;
- anything else (a bug, bad data): retried like a transient error, and parked by the
  attempt that reaches `consumer_delivery_limit`.
The queue's `x-delivery-limit` is the backstop for a message that kills its consumer
before it can be rejected: past the limit RabbitMQ dead-letters it by itself (visible in
the parking queue's depth and its `x-death` header, not in this process's metrics).

An event that occurred longer ago than `inbox_retention_days` is parked too: housekeeping
(tally_kit.housekeeping) has deleted the inbox ids of events that old, so it could be a
duplicate no longer recognised (a parked message replayed by hand months later, say).

Events of a merchant this service has no database for: `MerchantDirectory.transaction`
raises `NotFound`, so by default such an event is parked. A service that provisions
merchants on first sight passes `prepare_merchant=directory.provision`, which runs before
the event's transaction opens (its own failures are classified like the handler's).

A handler that publishes events writes them to the outbox in its transaction; a service
passes `after_commit=relay.notify` so the relay publishes them right after the commit
rather than at its next sweep.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from google.protobuf.message import DecodeError, Message
from tally.common.v1.event_pb2 import EventEnvelope

from tally_kit import context, errors
from tally_kit.events import metrics
from tally_kit.events.databases import MerchantDatabases
from tally_kit.events.envelope import UnknownPayloadType, unpack_payload
from tally_kit.events.topology import (
    connect,
    declare_consumer_topology,
    events_queue_name,
    parking_queue_name,
)
from tally_kit.failpoints import failpoint
from tally_kit.settings import ServiceSettings

log = logging.getLogger(__name__)

Handler = Callable[[asyncpg.Connection, EventEnvelope, Message], Awaitable[None]]

_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    errors.Unavailable,
    errors.Aborted,
    asyncpg.PostgresConnectionError,  # class 08, and a connection that went away
    asyncpg.TransactionRollbackError,  # class 40: serialization failure, deadlock
    asyncpg.InsufficientResourcesError,  # class 53: too many connections
    asyncpg.OperatorInterventionError,  # class 57: shutdown, cannot connect now, cancelled
    OSError,  # connection refused or reset
    TimeoutError,
)

_RECORD_IN_INBOX = """
INSERT INTO inbox (event_id, merchant_id, consumer, event_type) VALUES ($1, $2, $3, $4)
ON CONFLICT (event_id) DO NOTHING
RETURNING true
"""


def is_transient(error: BaseException) -> bool:
    """Whether the same work may succeed if simply tried again later."""
    return isinstance(error, _TRANSIENT_ERRORS)


class PoisonMessage(Exception):
    """A message that no retry can make handleable."""


class EventConsumer:
    def __init__(
        self,
        settings: ServiceSettings,
        databases: MerchantDatabases,
        *,
        service: str,
        handlers: Mapping[str, Handler],
        prepare_merchant: Callable[[str], Awaitable[object]] | None = None,
        after_commit: Callable[[str], object] | None = None,
        retry_backoff_seconds: float = 0.5,
        retry_backoff_max_seconds: float = 30.0,
    ) -> None:
        self._settings = settings
        self._databases = databases
        self._service = service
        self._handlers = dict(handlers)
        self._prepare_merchant = prepare_merchant
        self._after_commit = after_commit
        self._retry_backoff_seconds = retry_backoff_seconds
        self._retry_backoff_max_seconds = retry_backoff_max_seconds
        self._parking_queue = parking_queue_name(service)
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._in_flight: set[asyncio.Task[object]] = set()

    @property
    def queue_name(self) -> str:
        return events_queue_name(self._service)

    async def start(self) -> None:
        """Connect, declare the service's topology and start consuming."""
        self._connection = await connect(self._settings, f"{self._service} event consumer")
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._settings.consumer_prefetch)
        self._queue = await declare_consumer_topology(
            channel,
            exchange=self._settings.events_exchange,
            service=self._service,
            routing_keys=self._handlers,
            delivery_limit=self._settings.consumer_delivery_limit,
        )
        self._consumer_tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop consuming, let in-flight handlers finish (within the grace period), then disconnect.

        Messages still unacknowledged when the connection closes are redelivered elsewhere.
        """
        assert self._connection is not None and self._queue is not None and self._consumer_tag is not None
        await self._queue.cancel(self._consumer_tag)
        if self._in_flight:
            _, unfinished = await asyncio.wait(
                set(self._in_flight), timeout=self._settings.shutdown_grace_seconds
            )
            if unfinished:
                log.warning("%d event handlers still running at shutdown; redelivered later", len(unfinished))
        await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aio-pika runs each delivery in its own task: track it so stop() can wait for it,
        # and so the contextvars set below belong to this event only.
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            await self._process(message)
        finally:
            self._in_flight.discard(task)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        # Bindings are exact handler keys, so the routing key is a bounded metric label.
        event_type = message.routing_key if message.routing_key in self._handlers else "unknown"
        try:
            envelope, payload, handler = self._decode(message)
        except PoisonMessage as poison:
            await self._park(message, event_type, str(poison))
            return
        context.correlation_id.set(envelope.correlation_id)
        context.merchant_id.set(envelope.merchant_id)
        started = time.perf_counter()
        try:
            if self._prepare_merchant is not None:
                await self._prepare_merchant(envelope.merchant_id)
            async with self._databases.transaction(envelope.merchant_id) as conn:
                first_delivery = await conn.fetchval(
                    _RECORD_IN_INBOX,
                    uuid.UUID(envelope.event_id),
                    envelope.merchant_id,
                    self._service,
                    envelope.event_type,
                )
                if first_delivery:
                    await handler(conn, envelope, payload)
        except Exception as failure:
            await self._on_failure(message, envelope, event_type, failure)
            return
        finally:
            metrics.event_handling.labels(event_type).observe(time.perf_counter() - started)
        if first_delivery and self._after_commit is not None:
            self._after_commit(envelope.merchant_id)
        failpoint("consumer.after_commit")
        await self._settle(message.ack(), message)
        metrics.events_consumed.labels(event_type, "handled" if first_delivery else "duplicate").inc()

    def _decode(self, message: AbstractIncomingMessage) -> tuple[EventEnvelope, Message, Handler]:
        try:
            envelope = EventEnvelope.FromString(message.body)
        except DecodeError as error:
            raise PoisonMessage(f"undecodable envelope: {error}") from error
        handler = self._handlers.get(envelope.event_type)
        if handler is None:
            raise PoisonMessage(f"no handler for event type {envelope.event_type!r}")
        try:
            uuid.UUID(envelope.event_id)
        except ValueError:
            raise PoisonMessage(f"event id {envelope.event_id!r} is not a UUID") from None
        if not envelope.merchant_id:
            raise PoisonMessage("envelope has no merchant id")
        retention_days = self._settings.inbox_retention_days
        if envelope.occurred_at.seconds < time.time() - retention_days * 86400:
            # Housekeeping has deleted the inbox ids of events that old: a replay could apply twice.
            raise PoisonMessage(
                f"event is older than the inbox's {retention_days:g}-day memory of handled events: "
                "it cannot be told from a redelivery; check whether it was applied before replaying it"
            )
        try:
            payload = unpack_payload(envelope)
        except UnknownPayloadType as error:
            raise PoisonMessage(str(error)) from error
        return envelope, payload, handler

    async def _on_failure(
        self,
        message: AbstractIncomingMessage,
        envelope: EventEnvelope,
        event_type: str,
        failure: Exception,
    ) -> None:
        attempt = int(message.headers.get("x-delivery-count") or 0) + 1
        if isinstance(failure, errors.TallyError) and not is_transient(failure):
            await self._park(message, event_type, f"{type(failure).__name__}: {failure}")
            return
        if attempt >= self._settings.consumer_delivery_limit:
            log.error("event %s failed on its last attempt %d", envelope.event_id, attempt, exc_info=failure)
            await self._park(message, event_type, f"gave up after {attempt} attempts: {failure!r}")
            return
        log.warning(
            "event %s attempt %d failed, retrying",
            envelope.event_id,
            attempt,
            # A transient failure is expected now and then; anything else deserves its traceback.
            exc_info=None if is_transient(failure) else failure,
        )
        delay = min(self._retry_backoff_max_seconds, self._retry_backoff_seconds * 2 ** (attempt - 1))
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        await self._settle(message.nack(requeue=True), message)
        metrics.events_consumed.labels(event_type, "retried").inc()

    async def _park(self, message: AbstractIncomingMessage, event_type: str, reason: str) -> None:
        log.error(
            "parking message %s (%s) in %s: %s", message.message_id, event_type, self._parking_queue, reason
        )
        await self._settle(message.reject(requeue=False), message)
        metrics.events_consumed.labels(event_type, "parked").inc()
        metrics.events_parked.labels(self._parking_queue).inc()

    @staticmethod
    async def _settle(settlement: Awaitable[None], message: AbstractIncomingMessage) -> None:
        # If the channel is gone the broker requeues the message by itself; the inbox
        # absorbs the redelivery of one already handled.
        try:
            await settlement
        except Exception:
            log.warning(
                "could not settle message %s; the broker redelivers it",
                message.message_id,
                exc_info=True,
            )
