"""Periodic jobs over every merchant database, shared by replicas through row claims.

A job is a `ClaimedWork`: how to claim a batch of due items in a merchant database, and how
to handle one. `PeriodicJob` runs it every `interval_seconds`: each run walks the merchants
(`MerchantDatabases.merchant_ids()`, every replica's) one after another and, in each, claims
and handles batches until none is left.

Claims
------
`claim` selects due items with `FOR UPDATE ... SKIP LOCKED` inside the batch's transaction,
so the rows stay locked until the batch commits and a replica running the same job at the
same time skips them rather than waiting: each item is handled by one replica, and the
other finds it handled (no longer due) on its next run. An item whose row is locked by
another transaction is simply left for the next run.

Each claim continues after the last key of the previous batch (keyset order), so a run
visits every due item at most once: an item that fails is not claimed again in the same run,
and a run always ends.

Handling
--------
Every item is handled in a savepoint of the batch's transaction: a failing item is rolled
back alone, logged and counted, and the rest of the batch commits. An item must be
idempotent: whatever a crash leaves undone is claimed again by a later run, and whatever
committed is no longer due. Handlers publish events through the `Transaction` they are given
(the outbox, in the batch's transaction); the relay is notified after the commit.

A merchant whose database cannot be reached is logged and skipped; the walk goes on with
the next. One log line per committed batch that claimed anything says how many items it
claimed, handled and failed; one per run says how many merchants were walked, items handled
and failed, and how long it took.

Metrics: `tally_job_runs_total{job,outcome}` (`ok`; `partial` when an item or a merchant
failed; `failed` when the merchants could not even be listed), `tally_job_items_total{job}`,
`tally_job_item_failures_total{job}`, `tally_job_duration_seconds{job}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

import asyncpg
from prometheus_client import Counter, Histogram

from tally_kit.events.databases import MerchantDatabases
from tally_kit.uow import RelayNotifier, Transaction

log = logging.getLogger(__name__)

K = TypeVar("K")

Clock = Callable[[], datetime]

job_runs = Counter(
    "tally_job_runs_total", "Runs of periodic jobs, by outcome: ok, partial, failed.", ["job", "outcome"]
)
job_items = Counter("tally_job_items_total", "Items periodic jobs handled (committed).", ["job"])
job_item_failures = Counter(
    "tally_job_item_failures_total", "Items periodic jobs failed to handle; retried by a later run.", ["job"]
)
job_duration = Histogram(
    "tally_job_duration_seconds",
    "Time one run of a periodic job took, every merchant included.",
    ["job"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


def utc_now() -> datetime:
    return datetime.now(UTC)


class ClaimedWork(Protocol[K]):
    """What one periodic job does in one merchant database."""

    async def claim(
        self, conn: asyncpg.Connection, merchant_id: str, *, now: datetime, after: K | None, limit: int
    ) -> Sequence[K]:
        """Up to `limit` keys of items due at `now`, after `after` (None: from the start) in key
        order, their rows locked with `FOR UPDATE ... SKIP LOCKED` in the caller's transaction."""
        ...

    async def handle(self, tx: Transaction, merchant_id: str, key: K, *, now: datetime) -> None:
        """Handles one claimed item inside the claim's transaction; must be idempotent."""
        ...


@dataclass(frozen=True)
class JobRun:
    """What one run did."""

    merchants: int
    items: int
    failures: int
    merchant_failures: int
    seconds: float

    @property
    def outcome(self) -> str:
        return "partial" if self.failures or self.merchant_failures else "ok"


class PeriodicJob(Generic[K]):
    """Runs `work` over every merchant database now and then every `interval_seconds`."""

    def __init__(
        self,
        name: str,
        work: ClaimedWork[K],
        databases: MerchantDatabases,
        *,
        producer: str,
        interval_seconds: float,
        batch_size: int = 100,
        relay: RelayNotifier | None = None,
        clock: Clock = utc_now,
        stop_grace_seconds: float = 10.0,
    ) -> None:
        if interval_seconds <= 0 or batch_size < 1:
            raise ValueError("interval_seconds must be positive and batch_size at least 1")
        self.name = name
        self._work = work
        self._databases = databases
        self._producer = producer
        self._interval_seconds = interval_seconds
        self._batch_size = batch_size
        self._relay = relay
        self._clock = clock
        self._stop_grace_seconds = stop_grace_seconds
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Runs in the background: a first run right away, then one every interval."""
        if self._task is not None:
            raise RuntimeError(f"job {self.name} is already started")
        self._stopping.clear()
        self._task = asyncio.create_task(self._run_periodically(), name=f"job-{self.name}")

    async def stop(self) -> None:
        """Ends the run in progress after its current batch (within the grace period), then stops."""
        if self._task is None:
            return
        task, self._task = self._task, None
        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self._stop_grace_seconds)
        except TimeoutError:
            # The batch in flight rolls back; its items stay due for the next run.
            log.warning("job %s still running after %.1f s; cancelled", self.name, self._stop_grace_seconds)
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> JobRun:
        """One walk over every merchant database."""
        started = time.perf_counter()
        items = failures = merchant_failures = walked = 0
        try:
            merchant_ids = await self._databases.merchant_ids()
        except Exception:
            job_runs.labels(self.name, "failed").inc()
            raise
        for merchant_id in merchant_ids:
            if self._stopping.is_set():
                break
            walked += 1
            try:
                handled, failed = await self._run_merchant(merchant_id)
            except Exception:
                # One merchant's database must not stop the walk over the others.
                log.exception("job %s: merchant %s failed; retried next run", self.name, merchant_id)
                merchant_failures += 1
                continue
            items += handled
            failures += failed
        run = JobRun(walked, items, failures, merchant_failures, time.perf_counter() - started)
        job_runs.labels(self.name, run.outcome).inc()
        job_duration.labels(self.name).observe(run.seconds)
        log.info(
            "job %s: %d merchants walked, %d items handled, %d failed in %.3f s",
            self.name,
            run.merchants,
            run.items,
            run.failures + run.merchant_failures,
            run.seconds,
            extra={
                "job": self.name,
                "merchants": run.merchants,
                "items": run.items,
                "item_failures": run.failures,
                "merchant_failures": run.merchant_failures,
                "duration_seconds": round(run.seconds, 6),
            },
        )
        return run

    async def _run_merchant(self, merchant_id: str) -> tuple[int, int]:
        """(items handled, items failed) in one merchant database, batch after batch."""
        handled = failed = 0
        after: K | None = None
        while not self._stopping.is_set():
            now = self._clock()
            async with self._databases.transaction(merchant_id) as conn:
                keys = await self._work.claim(conn, merchant_id, now=now, after=after, limit=self._batch_size)
                tx = Transaction(conn, merchant_id=merchant_id, producer=self._producer)
                batch_handled = batch_failed = 0
                for key in keys:
                    try:
                        async with conn.transaction():
                            await self._work.handle(tx, merchant_id, key, now=now)
                    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
                        # The batch's transaction is gone with its connection: nothing commits.
                        raise
                    except Exception:
                        log.exception("job %s: merchant %s item %s failed", self.name, merchant_id, key)
                        job_item_failures.labels(self.name).inc()
                        batch_failed += 1
                    else:
                        batch_handled += 1
            handled += batch_handled
            failed += batch_failed
            job_items.labels(self.name).inc(batch_handled)
            if keys:
                log.info(
                    "job %s: merchant %s: batch of %d committed, %d handled, %d failed",
                    self.name,
                    merchant_id,
                    len(keys),
                    batch_handled,
                    batch_failed,
                    extra={
                        "job": self.name,
                        "merchant_id": merchant_id,
                        "claimed": len(keys),
                        "items": batch_handled,
                        "item_failures": batch_failed,
                    },
                )
            if tx.published and self._relay is not None:
                self._relay.notify(merchant_id)
            if len(keys) < self._batch_size:
                break
            after = keys[-1]
        return handled, failed

    async def _run_periodically(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception:
                log.exception("job %s: run failed", self.name)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval_seconds)
