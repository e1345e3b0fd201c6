"""Housekeeping: the kit's own tables keep their rows for a while, then no longer need them.

In every merchant database, every `housekeeping_interval_seconds`:
- `outbox` rows published more than `outbox_retention_days` ago: the relay never reads a
  published row again; operators tracing an event find it there for that long;
- `inbox` rows of events handled more than `inbox_retention_days` ago: RabbitMQ redelivers
  an event long before that; an older one (a parked message replayed by hand, say) can no
  longer be recognised as a duplicate, so the consumer parks it rather than apply it twice;
- `idempotency_keys` older than `idempotency_retention_days`: a request repeated with its
  request_id after that is a new request.

Rows are deleted oldest first, `housekeeping_batch_size` per transaction, so that no
transaction holds many row locks or writes a burst of WAL; rows still in use (an outbox
row not yet published, a key whose transaction has not committed) are never candidates.
Times are the database's own clock, the one that stamped the rows. Deletes are idempotent,
so two replicas running at once only share the work.

The run is counted like the periodic jobs' (`tally_job_runs_total`,
`tally_job_duration_seconds`, job `housekeeping`), the rows deleted in
`tally_housekeeping_rows_deleted_total{table}`, and logged once per run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from dataclasses import dataclass

from prometheus_client import Counter

from tally_kit.events.databases import MerchantDatabases
from tally_kit.jobs import job_duration, job_runs
from tally_kit.settings import ServiceSettings

log = logging.getLogger(__name__)

JOB_NAME = "housekeeping"

rows_deleted = Counter(
    "tally_housekeeping_rows_deleted_total",
    "Rows of the kit's tables deleted past their retention (outbox, inbox, idempotency_keys).",
    ["table"],
)

_SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class Retention:
    """One table's rule: rows whose `stamped` time is older than the retention go, oldest
    first (in `order`, which an index serves)."""

    table: str
    key: str
    stamped: str
    order: str

    def delete_batch_sql(self) -> str:
        # $1: the retention in seconds; $2: rows per batch. NULL stamps (an outbox row not
        # yet published) never compare older. A row locked by a transaction in flight is left
        # for the next run.
        return (
            f"DELETE FROM {self.table} WHERE {self.key} IN ("
            f"SELECT {self.key} FROM {self.table}"
            f" WHERE {self.stamped} < now() - make_interval(secs => $1::double precision)"
            f" ORDER BY {self.order} LIMIT $2 FOR UPDATE SKIP LOCKED)"
        )


OUTBOX = Retention("outbox", "id", "published_at", "id")
INBOX = Retention("inbox", "event_id", "handled_at", "handled_at")
IDEMPOTENCY_KEYS = Retention("idempotency_keys", "request_id", "created_at", "created_at")


class Housekeeping:
    """Deletes the kit's rows past their retention in every merchant database, now and then."""

    def __init__(self, settings: ServiceSettings, databases: MerchantDatabases) -> None:
        self._databases = databases
        self._interval_seconds = settings.housekeeping_interval_seconds
        self._batch_size = settings.housekeeping_batch_size
        self._rules = (
            (OUTBOX, settings.outbox_retention_days * _SECONDS_PER_DAY),
            (INBOX, settings.inbox_retention_days * _SECONDS_PER_DAY),
            (IDEMPOTENCY_KEYS, settings.idempotency_retention_days * _SECONDS_PER_DAY),
        )
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Runs in the background: a first run right away, then one every interval."""
        if self._task is not None:
            raise RuntimeError("housekeeping is already started")
        self._stopping.clear()
        self._task = asyncio.create_task(self._run_periodically(), name=JOB_NAME)

    async def stop(self) -> None:
        """Ends the run in progress after its current batch, then stops."""
        if self._task is None:
            return
        task, self._task = self._task, None
        self._stopping.set()
        await task

    async def run_once(self) -> dict[str, int]:
        """One walk over every merchant database; the rows deleted, by table."""
        started = time.perf_counter()
        deleted = {rule.table: 0 for rule, _ in self._rules}
        failed_merchants = 0
        try:
            merchant_ids = await self._databases.merchant_ids()
        except Exception:
            job_runs.labels(JOB_NAME, "failed").inc()
            raise
        for merchant_id in merchant_ids:
            if self._stopping.is_set():
                break
            try:
                for rule, retention_seconds in self._rules:
                    deleted[rule.table] += await self._delete_expired(merchant_id, rule, retention_seconds)
            except Exception:
                # One merchant's database must not stop the walk over the others.
                log.exception("housekeeping: merchant %s failed; retried next run", merchant_id)
                failed_merchants += 1
        seconds = time.perf_counter() - started
        job_runs.labels(JOB_NAME, "partial" if failed_merchants else "ok").inc()
        job_duration.labels(JOB_NAME).observe(seconds)
        log.info(
            "housekeeping: %d merchants walked, rows deleted: %s, in %.3f s",
            len(merchant_ids),
            ", ".join(f"{table} {count}" for table, count in deleted.items()),
            seconds,
            extra={
                "job": JOB_NAME,
                "merchants": len(merchant_ids),
                "merchant_failures": failed_merchants,
                "rows_deleted": deleted,
                "duration_seconds": round(seconds, 6),
            },
        )
        return deleted

    async def _delete_expired(self, merchant_id: str, rule: Retention, retention_seconds: float) -> int:
        sql = rule.delete_batch_sql()
        total = 0
        while not self._stopping.is_set():
            async with self._databases.transaction(merchant_id) as conn:
                status = await conn.execute(sql, retention_seconds, self._batch_size)
            count = int(status.split()[-1])
            rows_deleted.labels(rule.table).inc(count)
            total += count
            if count < self._batch_size:
                break
        return total

    async def _run_periodically(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception:
                log.exception("housekeeping: run failed")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval_seconds)
