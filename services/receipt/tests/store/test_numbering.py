"""Gapless numbering against the real PostgreSQL: concurrency, rollbacks, and what the schema refuses."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import secrets
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import asyncpg
import pytest
from tally.common.v1.event_pb2 import EventEnvelope
from tally.receipt.v1 import events_pb2
from tally_kit.amounts import Money
from tally_kit.db import MerchantDirectory
from tally_kit.errors import Aborted
from tally_receipt import domain, store
from tally_receipt.domain import DocumentKind, MerchantProfile, Purchase, Receipt
from tally_receipt.handlers import issue_receipt

pytestmark = pytest.mark.integration

CONCURRENT_RECEIPTS = 100
ROLLED_BACK_ISSUES = 20


class RolledBack(Exception):
    """Raised inside an issuing transaction to roll it back after its number was allocated."""


def purchase(merchant_id: str, *, user_id: str = "user-1", amount_minor: int = 1000) -> Purchase:
    return Purchase(
        merchant_id=merchant_id,
        user_id=user_id,
        order_id=f"order-{uuid4()}",
        product_id=str(uuid4()),
        product_name="Starter pack",
        amount_paid=Money(amount_minor, "EUR"),
        payment_id="",
        provider_reference=f"psp-{secrets.token_hex(4)}",
        lot_id=str(uuid4()),
        settled_at=datetime.now(UTC),
    )


async def issue(directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile) -> Receipt:
    async with directory.transaction(merchant_id) as conn:
        return await issue_receipt(conn, purchase(merchant_id), profile, now=datetime.now(UTC))


async def issue_then_roll_back(
    directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile
) -> None:
    with pytest.raises(RolledBack):
        async with directory.transaction(merchant_id) as conn:
            await issue_receipt(conn, purchase(merchant_id), profile, now=datetime.now(UTC))
            raise RolledBack


async def series_rows(directory: MerchantDirectory, merchant_id: str, series: str) -> list[asyncpg.Record]:
    async with directory.connection(merchant_id) as conn:
        return await conn.fetch(
            "SELECT sequence, number, issued_at FROM receipts WHERE merchant_id = $1 AND series = $2 "
            "ORDER BY sequence",
            merchant_id,
            series,
        )


async def test_100_concurrent_receipts_of_one_merchant_are_numbered_1_to_100(
    directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile, series: str
) -> None:
    # Interleaved with issues that roll back after taking a number: those numbers are reused.
    work = [issue(directory, merchant_id, profile) for _ in range(CONCURRENT_RECEIPTS)]
    work += [issue_then_roll_back(directory, merchant_id, profile) for _ in range(ROLLED_BACK_ISSUES)]
    random.shuffle(work)

    outcomes = await asyncio.gather(*work)

    receipts = [outcome for outcome in outcomes if isinstance(outcome, Receipt)]
    expected = list(range(1, CONCURRENT_RECEIPTS + 1))
    assert sorted(receipt.number.sequence for receipt in receipts) == expected
    rows = await series_rows(directory, merchant_id, series)
    assert [row["sequence"] for row in rows] == expected
    year = receipts[0].number.year
    assert [row["number"] for row in rows] == [f"{series}-{year}-{n:06d}" for n in expected]
    # Issue times follow the numbers.
    issue_times = [row["issued_at"] for row in rows]
    assert issue_times == sorted(issue_times)
    async with directory.connection(merchant_id) as conn:
        last = await conn.fetchval(
            "SELECT last_sequence FROM document_series "
            "WHERE merchant_id = $1 AND kind = 'receipt' AND series = $2",
            merchant_id,
            series,
        )
    assert last == CONCURRENT_RECEIPTS


async def test_an_issuer_waits_for_the_previous_number_and_takes_it_back_after_a_rollback(
    directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile, series: str
) -> None:
    async with directory.connection(merchant_id) as first:
        transaction = first.transaction()
        await transaction.start()
        held = await store.allocate_number(
            first, merchant_id, DocumentKind.RECEIPT, series, datetime.now(UTC)
        )
        assert held.number.sequence == 1
        second = asyncio.create_task(issue(directory, merchant_id, profile))
        await asyncio.sleep(0.3)
        assert not second.done(), "the second issuer must wait on the series row"
        await transaction.rollback()
        receipt = await asyncio.wait_for(second, timeout=10)
    assert receipt.number.sequence == 1
    assert [row["sequence"] for row in await series_rows(directory, merchant_id, series)] == [1]


async def test_each_year_and_series_counts_from_1(
    directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile, series: str
) -> None:
    other = dataclasses.replace(profile, series_prefix=f"{series}-B")
    last_second = datetime(2031, 12, 31, 23, 59, 59, tzinfo=UTC)
    numbers = []
    for when, issuer in (
        (last_second, profile),
        (last_second + timedelta(seconds=2), profile),
        (last_second, other),
    ):
        async with directory.transaction(merchant_id) as conn:
            receipt = await issue_receipt(conn, purchase(merchant_id), issuer, now=when)
        numbers.append(receipt.number.text)
    assert numbers == [f"{series}-2031-000001", f"{series}-2032-000001", f"{series}-B-2031-000001"]


async def test_issue_times_never_go_back_within_a_series(
    directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile
) -> None:
    # A replica whose clock is slightly behind issues the next number at the previous time.
    ahead = datetime(2033, 6, 1, 12, 0, 1, tzinfo=UTC)
    async with directory.transaction(merchant_id) as conn:
        first = await issue_receipt(conn, purchase(merchant_id), profile, now=ahead)
    async with directory.transaction(merchant_id) as conn:
        second = await issue_receipt(conn, purchase(merchant_id), profile, now=ahead - timedelta(seconds=1))
    assert second.number.sequence == first.number.sequence + 1
    assert second.issued_at == first.issued_at == ahead


async def test_a_number_allocated_without_its_document_cannot_commit(
    directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile, series: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="no document carries it"):
        async with directory.transaction(merchant_id) as conn:
            await store.allocate_number(conn, merchant_id, DocumentKind.RECEIPT, series, datetime.now(UTC))
    receipt = await issue(directory, merchant_id, profile)
    assert receipt.number.sequence == 1


async def test_a_document_must_carry_the_number_its_transaction_allocated(
    directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile, series: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="number just allocated"):
        async with directory.transaction(merchant_id) as conn:
            allocation = await store.allocate_number(
                conn, merchant_id, DocumentKind.RECEIPT, series, datetime.now(UTC)
            )
            skipping = dataclasses.replace(allocation.number, sequence=allocation.number.sequence + 1)
            receipt = domain.new_receipt(
                purchase(merchant_id),
                profile,
                receipt_id=uuid4(),
                number=skipping,
                issued_at=allocation.issued_at,
            )
            await store.insert_receipt(conn, receipt)
    with pytest.raises(asyncpg.CheckViolationError, match="starts at 1"):
        async with directory.transaction(merchant_id) as conn:
            await conn.execute(
                "INSERT INTO document_series "
                "(merchant_id, kind, series, year, last_sequence, last_issued_at) "
                "VALUES ($1, 'receipt', $2, 2030, 5, now())",
                merchant_id,
                f"{series}-X",
            )


async def test_documents_and_counters_are_never_changed_or_removed(
    directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile, series: str
) -> None:
    receipt = await issue(directory, merchant_id, profile)
    statements = [
        (
            "UPDATE receipts SET gross_minor = 1, net_minor = 1, tax_minor = 0 WHERE receipt_id = $1",
            receipt.receipt_id,
        ),
        ("DELETE FROM receipts WHERE receipt_id = $1", receipt.receipt_id),
        ("UPDATE receipt_lines SET description = 'x' WHERE receipt_id = $1", receipt.receipt_id),
        ("DELETE FROM document_series WHERE series = $1", series),
        ("UPDATE document_series SET last_sequence = last_sequence - 1 WHERE series = $1", series),
    ]
    for statement, argument in statements:
        with pytest.raises((asyncpg.RestrictViolationError, asyncpg.CheckViolationError)):
            async with directory.transaction(merchant_id) as conn:
                await conn.execute(statement, argument)
    for table in ("receipts", "receipt_lines", "credit_notes", "document_series"):
        with pytest.raises(asyncpg.RestrictViolationError):
            async with directory.transaction(merchant_id) as conn:
                await conn.execute(f"TRUNCATE {table} CASCADE")


async def test_one_receipt_per_order_even_when_two_issuers_race(
    directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile, series: str
) -> None:
    order = purchase(merchant_id)
    async with directory.transaction(merchant_id) as conn:
        await issue_receipt(conn, order, profile, now=datetime.now(UTC))
    with pytest.raises(Aborted) as raced:
        async with directory.transaction(merchant_id) as conn:
            await issue_receipt(conn, order, profile, now=datetime.now(UTC))
    assert raced.value.reason == "CONCURRENT_ISSUE"
    # The loser's number went back with its rollback.
    assert [row["sequence"] for row in await series_rows(directory, merchant_id, series)] == [1]


async def test_the_issued_event_is_written_with_the_receipt(
    directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile
) -> None:
    receipt = await issue(directory, merchant_id, profile)
    async with directory.connection(merchant_id) as conn:
        rows = await conn.fetch("SELECT event_type, envelope FROM outbox WHERE merchant_id = $1", merchant_id)
    issued = []
    for row in rows:
        envelope = EventEnvelope.FromString(row["envelope"])
        payload = events_pb2.ReceiptIssued()
        if row["event_type"] == "receipt.receipt_issued" and envelope.payload.Unpack(payload):
            issued.append(payload.receipt)
    [announced] = [message for message in issued if message.receipt_id == str(receipt.receipt_id)]
    assert announced.number == receipt.number.text
    assert announced.totals.gross.amount_minor == 1000
