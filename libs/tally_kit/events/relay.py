"""The outbox relay: publishes each merchant database's outbox to the events exchange.

Fast path: after a commit that wrote events, the caller calls `notify(merchant_id)`; one
background task publishes that merchant's pending rows right away. Bursts coalesce: a
merchant notified many times before the task gets to it is drained once.

Safety net: at start-up and then every `outbox_sweep_interval_seconds`, every merchant
database is swept once for rows the fast path missed (a crash between commit and
publish, a notify lost with its process, a broker outage). Nothing ever polls every
merchant database in a tight loop.

Rows are claimed with `SELECT ... FOR UPDATE SKIP LOCKED` in id order, in batches, and
stay locked until they are published and marked, so relays in several replicas (or the
fast path and a sweep in one) never publish the same row at the same time. A crash after
publishing but before marking republishes the row later: delivery is at least once, and
consumers deduplicate on the event id (inbox).

Publishing waits for the broker's confirm and uses `mandatory`, so an event is marked
published only once a queue holds it: a consumer's queue, or, for an event type no
service consumes yet, the queue behind the exchange's alternate exchange (see
`topology`). An event returned even so (that topology is broken) is a failure: logged,
counted, and left pending for the next sweep rather than dropped.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from datetime import UTC

import aio_pika
import asyncpg
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from aiormq.exceptions import DeliveryError, PublishError
from tally.common.v1.event_pb2 import EventEnvelope
from tenacity import AsyncRetrying, before_sleep_log, stop_after_delay, wait_exponential_jitter

from tally_kit.events import metrics
from tally_kit.events.databases import MerchantDatabases
from tally_kit.events.envelope import CONTENT_TYPE
from tally_kit.events.topology import connect, declare_events_exchange
from tally_kit.failpoints import failpoint
from tally_kit.settings import ServiceSettings

log = logging.getLogger(__name__)

# A publish whose confirm has not arrived by then is treated as failed (and retried).
PUBLISH_TIMEOUT_SECONDS = 10.0

_CLAIM_PENDING = """
SELECT id, event_id, event_type, envelope
FROM outbox
WHERE merchant_id = $1 AND published_at IS NULL AND id > $2
ORDER BY id
LIMIT $3
FOR UPDATE SKIP LOCKED
"""

_MARK_PUBLISHED = """
UPDATE outbox SET published_at = clock_timestamp()
WHERE merchant_id = $1 AND id = ANY($2::bigint[])
RETURNING event_type, extract(epoch FROM published_at - created_at)::float8 AS lag_seconds
"""


class OutboxRelay:
    def __init__(
        self,
        settings: ServiceSettings,
        databases: MerchantDatabases,
        *,
        producer: str,
        batch_size: int = 100,
    ) -> None:
        self._settings = settings
        self._databases = databases
        self._producer = producer
        self._batch_size = batch_size
        # Merchants notified and not yet drained, in notification order (a dict as an ordered set).
        self._notified: dict[str, None] = {}
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._fast_path: asyncio.Task[None] | None = None
        self._safety_net: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, then run the fast path and the sweeps (the first one right away) in the background."""
        self._connection = await connect(self._settings, f"{self._producer} outbox relay")
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._exchange = await declare_events_exchange(channel, self._settings.events_exchange)
        self._fast_path = asyncio.create_task(self._run_fast_path(), name="outbox-relay-fast-path")
        self._safety_net = asyncio.create_task(self._run_sweeps(), name="outbox-relay-sweeps")

    def notify(self, merchant_id: str) -> None:
        """Ask for the merchant's pending events to be published now; never blocks."""
        if self._stopping.is_set():
            # Too late for this process; the rows stay pending for the next start-up sweep.
            log.warning("outbox relay stopping; events of merchant %s left for the next sweep", merchant_id)
            return
        self._notified[merchant_id] = None
        self._wakeup.set()

    async def stop(self) -> None:
        """Publish what was notified and is still pending, end a running sweep, then disconnect.

        A sweep in progress stops after the merchant it is on, rather than being cut off
        between publishing and marking (which would publish those events again later).
        All of it is bounded by `shutdown_grace_seconds`; what is left stays in the outbox
        for the next start-up sweep.
        """
        assert self._connection is not None and self._fast_path is not None and self._safety_net is not None
        self._stopping.set()
        self._wakeup.set()
        try:
            await asyncio.wait_for(
                asyncio.gather(self._fast_path, self._safety_net),
                timeout=self._settings.shutdown_grace_seconds,
            )
        except TimeoutError:
            log.warning("outbox flush cut short by the grace period; the next start-up sweep publishes it")
        await self._connection.close()

    async def sweep(self) -> None:
        """Publish every merchant database's pending events, one merchant after another."""
        for merchant_id in await self._databases.merchant_ids():
            if self._stopping.is_set():
                return
            try:
                await self._publish_pending(merchant_id)
            except Exception:
                # One merchant's database or a broker hiccup must not stop the sweep of the others.
                log.exception("outbox sweep: publishing events of merchant %s failed", merchant_id)
        metrics.outbox_sweeps.inc()

    async def _run_fast_path(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._notified:
                merchant_id = next(iter(self._notified))
                del self._notified[merchant_id]
                await self._publish_with_retry(merchant_id)
            if self._stopping.is_set():
                return

    async def _run_sweeps(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.sweep()
            except Exception:
                log.exception("outbox sweep failed")
            with suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopping.wait(), timeout=self._settings.outbox_sweep_interval_seconds
                )

    async def _publish_with_retry(self, merchant_id: str) -> None:
        # Retry through broker and database outages for up to one sweep interval; past it
        # the rows are still pending and the sweep takes over, so the fast path is not
        # held up by one merchant for longer than that.
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.1),
            stop=stop_after_delay(self._settings.outbox_sweep_interval_seconds),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._publish_pending(merchant_id)
        except Exception:
            log.exception("giving up publishing events of merchant %s until the next sweep", merchant_id)

    async def _publish_pending(self, merchant_id: str) -> None:
        """Publish the merchant's pending events in id order, one claimed batch per transaction.

        Raises after marking what was confirmed if the broker failed, so the caller retries.
        """
        after_id = 0
        while True:
            async with self._databases.transaction(merchant_id) as conn:
                rows = await conn.fetch(_CLAIM_PENDING, merchant_id, after_id, self._batch_size)
                if not rows:
                    return
                outcomes = await asyncio.gather(*(self._publish(row) for row in rows), return_exceptions=True)
                failpoint("relay.after_publish")
                confirmed = [row["id"] for row, result in zip(rows, outcomes, strict=True) if result is None]
                marked = await conn.fetch(_MARK_PUBLISHED, merchant_id, confirmed) if confirmed else []
            for record in marked:
                metrics.events_published.labels(record["event_type"]).inc()
                metrics.outbox_publish_lag.observe(record["lag_seconds"])
            failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
            if failures:
                self._record_failures(merchant_id, failures)
                broker_failure = next((f for f in failures if not isinstance(f, PublishError)), None)
                if broker_failure is not None:
                    raise broker_failure
            if len(rows) < self._batch_size:
                return
            # Unroutable rows stay pending: move past them rather than claim them again now.
            after_id = rows[-1]["id"]

    async def _publish(self, row: asyncpg.Record) -> None:
        assert self._exchange is not None
        envelope = EventEnvelope.FromString(row["envelope"])
        message = aio_pika.Message(
            body=row["envelope"],
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(row["event_id"]),
            type=row["event_type"],
            correlation_id=envelope.correlation_id or None,
            timestamp=envelope.occurred_at.ToDatetime(tzinfo=UTC),
            app_id=self._producer,
        )
        await self._exchange.publish(
            message, routing_key=row["event_type"], mandatory=True, timeout=PUBLISH_TIMEOUT_SECONDS
        )

    @staticmethod
    def _record_failures(merchant_id: str, failures: list[BaseException]) -> None:
        reasons: dict[str, int] = {}
        for failure in failures:
            if isinstance(failure, PublishError):
                reason = "unroutable"
            elif isinstance(failure, DeliveryError):
                reason = "nacked"
            else:
                reason = "broker_unavailable"
            metrics.outbox_publish_failures.labels(reason).inc()
            reasons[reason] = reasons.get(reason, 0) + 1
        # The broker being away is retried by itself; unroutable or refused events need an operator.
        level = logging.WARNING if set(reasons) == {"broker_unavailable"} else logging.ERROR
        log.log(
            level,
            "%d outbox events of merchant %s not published (%s); they stay pending: %s",
            len(failures),
            merchant_id,
            ", ".join(f"{reason}: {count}" for reason, count in reasons.items()),
            failures[0],
        )
