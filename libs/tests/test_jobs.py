"""Periodic jobs against the real PostgreSQL: batches over every merchant, claims shared by
concurrent runs, failing items and merchants, locked rows skipped, start and stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta

import asyncpg
import pytest
from google.protobuf.wrappers_pb2 import Int32Value
from prometheus_client import REGISTRY
from tally_kit.db import MerchantDirectory, MigrationSource
from tally_kit.jobs import PeriodicJob
from tally_kit.settings import ServiceSettings
from tally_kit.uow import Transaction

pytestmark = pytest.mark.integration

MERCHANTS = ("jobs-acme", "jobs-globex")
POISON = 13


@pytest.fixture(scope="module")
def reminder_migrations(tmp_path_factory: pytest.TempPathFactory) -> MigrationSource:
    directory = tmp_path_factory.mktemp("reminder_migrations")
    (directory / "0001_reminders.sql").write_text(
        """
        CREATE TABLE reminders (
            merchant_id text        NOT NULL,
            reminder_id integer     NOT NULL,
            due_at      timestamptz NOT NULL,
            sent_at     timestamptz,
            sent_count  integer     NOT NULL DEFAULT 0,
            PRIMARY KEY (merchant_id, reminder_id)
        );
        """
    )
    return MigrationSource("reminders", directory)


@pytest.fixture(scope="module")
async def directory(
    kit_settings: ServiceSettings, reminder_migrations: MigrationSource
) -> AsyncIterator[MerchantDirectory]:
    directory = MerchantDirectory(
        kit_settings.model_copy(update={"service_name": "jobs"}), [reminder_migrations]
    )
    await directory.start()
    for merchant_id in MERCHANTS:
        await directory.provision(merchant_id)
    yield directory
    await directory.close()


@pytest.fixture(autouse=True)
async def empty_tables(directory: MerchantDirectory) -> None:
    for merchant_id in MERCHANTS:
        async with directory.transaction(merchant_id) as conn:
            await conn.execute("DELETE FROM reminders")
            await conn.execute("DELETE FROM outbox")


class SendReminders:
    """Sends due reminders: marks each sent and publishes an event. Reminder 13 always fails."""

    def __init__(self, pause_seconds: float = 0.0) -> None:
        self.pause_seconds = pause_seconds

    async def claim(
        self, conn: asyncpg.Connection, merchant_id: str, *, now: datetime, after: int | None, limit: int
    ) -> Sequence[int]:
        rows = await conn.fetch(
            """
            SELECT reminder_id FROM reminders
            WHERE merchant_id = $1 AND sent_at IS NULL AND due_at <= $2 AND reminder_id > $3
            ORDER BY reminder_id
            LIMIT $4
            FOR UPDATE SKIP LOCKED
            """,
            merchant_id,
            now,
            after if after is not None else -1,
            limit,
        )
        return [row["reminder_id"] for row in rows]

    async def handle(self, tx: Transaction, merchant_id: str, key: int, *, now: datetime) -> None:
        await tx.conn.execute(
            """
            UPDATE reminders SET sent_at = $3, sent_count = sent_count + 1
            WHERE merchant_id = $1 AND reminder_id = $2
            """,
            merchant_id,
            key,
            now,
        )
        await tx.publish("reminders.sent", Int32Value(value=key))
        if self.pause_seconds:
            await asyncio.sleep(self.pause_seconds)
        if key == POISON:
            raise RuntimeError("reminder 13 cannot be sent")


class RecordingRelay:
    def __init__(self) -> None:
        self.notified: list[str] = []

    def notify(self, merchant_id: str) -> None:
        self.notified.append(merchant_id)


async def add_reminders(
    directory: MerchantDirectory, merchant_id: str, ids: range | list[int], *, due_in: timedelta = timedelta()
) -> None:
    async with directory.transaction(merchant_id) as conn:
        await conn.executemany(
            "INSERT INTO reminders (merchant_id, reminder_id, due_at) VALUES ($1, $2, now() + $3::interval)",
            [(merchant_id, reminder_id, due_in) for reminder_id in ids],
        )


async def reminders(directory: MerchantDirectory, merchant_id: str) -> dict[int, int]:
    """sent_count by reminder id."""
    async with directory.connection(merchant_id) as conn:
        rows = await conn.fetch(
            "SELECT reminder_id, sent_count FROM reminders WHERE merchant_id = $1", merchant_id
        )
    return {row["reminder_id"]: row["sent_count"] for row in rows}


async def outbox_size(directory: MerchantDirectory, merchant_id: str) -> int:
    async with directory.connection(merchant_id) as conn:
        return await conn.fetchval("SELECT count(*) FROM outbox")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def job(directory: object, work: SendReminders, **options: object) -> PeriodicJob[int]:
    defaults: dict[str, object] = {"producer": "reminders", "interval_seconds": 60.0, "batch_size": 3}
    return PeriodicJob("send_reminders", work, directory, **{**defaults, **options})  # type: ignore[arg-type]


async def test_a_run_handles_every_due_item_of_every_merchant_in_batches(
    directory: MerchantDirectory,
) -> None:
    await add_reminders(directory, MERCHANTS[0], range(1, 8))
    await add_reminders(directory, MERCHANTS[1], [1, 2])
    await add_reminders(directory, MERCHANTS[1], [3, 4], due_in=timedelta(hours=1))
    relay = RecordingRelay()
    items_before = sample("tally_job_items_total", job="send_reminders")
    ok_runs = sample("tally_job_runs_total", job="send_reminders", outcome="ok")

    run = await job(directory, SendReminders(), relay=relay).run_once()

    assert (run.merchants, run.items, run.failures, run.outcome) == (2, 9, 0, "ok")
    assert await reminders(directory, MERCHANTS[0]) == dict.fromkeys(range(1, 8), 1)
    assert await reminders(directory, MERCHANTS[1]) == {1: 1, 2: 1, 3: 0, 4: 0}
    assert await outbox_size(directory, MERCHANTS[0]) == 7
    # Batches of 3: 3 + 3 + 1 for the first merchant, one batch for the second.
    assert relay.notified == [MERCHANTS[0]] * 3 + [MERCHANTS[1]]
    assert sample("tally_job_items_total", job="send_reminders") == items_before + 9
    assert sample("tally_job_runs_total", job="send_reminders", outcome="ok") == ok_runs + 1

    again = await job(directory, SendReminders()).run_once()
    assert again.items == 0, "what a run handled is no longer due"


async def test_concurrent_runs_handle_each_item_once(directory: MerchantDirectory) -> None:
    for merchant_id in MERCHANTS:
        await add_reminders(directory, merchant_id, range(20, 40))
    work = SendReminders(pause_seconds=0.005)

    runs = await asyncio.gather(*(job(directory, work).run_once() for _ in range(3)))

    assert sum(run.items for run in runs) == 40
    for merchant_id in MERCHANTS:
        assert await reminders(directory, merchant_id) == dict.fromkeys(range(20, 40), 1)
        assert await outbox_size(directory, merchant_id) == 20


async def test_a_failing_item_is_rolled_back_alone_and_retried_by_the_next_run(
    directory: MerchantDirectory,
) -> None:
    await add_reminders(directory, MERCHANTS[0], range(10, 17))
    failures_before = sample("tally_job_item_failures_total", job="send_reminders")
    partial_runs = sample("tally_job_runs_total", job="send_reminders", outcome="partial")

    run = await job(directory, SendReminders()).run_once()

    assert (run.items, run.failures, run.outcome) == (6, 1, "partial")
    sent = await reminders(directory, MERCHANTS[0])
    assert sent == {**dict.fromkeys(range(10, 17), 1), POISON: 0}
    # Its event was rolled back with it.
    assert await outbox_size(directory, MERCHANTS[0]) == 6
    assert sample("tally_job_item_failures_total", job="send_reminders") == failures_before + 1
    assert sample("tally_job_runs_total", job="send_reminders", outcome="partial") == partial_runs + 1

    retried = await job(directory, SendReminders()).run_once()
    assert (retried.items, retried.failures) == (0, 1)


class WithGhost:
    """The directory's merchants plus one whose database does not exist."""

    def __init__(self, directory: MerchantDirectory) -> None:
        self._directory = directory

    async def merchant_ids(self) -> list[str]:
        return ["jobs-ghost", *await self._directory.merchant_ids()]

    def transaction(self, merchant_id: str) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return self._directory.transaction(merchant_id)

    def connection(self, merchant_id: str) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return self._directory.connection(merchant_id)


async def test_a_merchant_that_fails_does_not_stop_the_walk(directory: MerchantDirectory) -> None:
    await add_reminders(directory, MERCHANTS[1], [1])

    run = await job(WithGhost(directory), SendReminders()).run_once()

    assert (run.merchants, run.merchant_failures, run.items, run.outcome) == (3, 1, 1, "partial")
    assert await reminders(directory, MERCHANTS[1]) == {1: 1}


async def test_rows_locked_elsewhere_are_skipped_not_waited_for(directory: MerchantDirectory) -> None:
    await add_reminders(directory, MERCHANTS[0], [1, 2, 3])
    async with directory.transaction(MERCHANTS[0]) as holder:
        await holder.execute("SELECT 1 FROM reminders WHERE reminder_id = 2 FOR UPDATE")
        run = await asyncio.wait_for(job(directory, SendReminders()).run_once(), timeout=5)
        assert run.items == 2
    assert await reminders(directory, MERCHANTS[0]) == {1: 1, 2: 0, 3: 1}

    assert (await job(directory, SendReminders()).run_once()).items == 1


async def test_started_job_runs_at_once_then_every_interval_until_stopped(
    directory: MerchantDirectory,
) -> None:
    await add_reminders(directory, MERCHANTS[0], [1])
    periodic = job(directory, SendReminders(), interval_seconds=0.1)
    await periodic.start()
    try:
        await eventually(lambda: reminders(directory, MERCHANTS[0]), {1: 1})
        await add_reminders(directory, MERCHANTS[0], [2])
        await eventually(lambda: reminders(directory, MERCHANTS[0]), {1: 1, 2: 1})
    finally:
        await asyncio.wait_for(periodic.stop(), timeout=5)
    await add_reminders(directory, MERCHANTS[0], [3])
    await asyncio.sleep(0.3)
    assert (await reminders(directory, MERCHANTS[0]))[3] == 0, "a stopped job runs no more"


async def eventually(read: Callable[[], Awaitable[object]], expected: object, *, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await read()
        if value == expected:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{value} != {expected} after {within} s"
        await asyncio.sleep(0.05)
