"""The token reseal job on the real PostgreSQL: tokens under an old key move to the active key
and still open to the same token; a run with nothing to do changes nothing; concurrent runs
(replicas) reseal each row once and skip rows another holds; rows under a key no longer listed,
or that do not open, are reported and left as they are."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import UUID

import pytest
from prometheus_client import REGISTRY
from tally_kit.db import MerchantDirectory
from tally_kit.jobs import JobRun, PeriodicJob
from tally_payment_gateway import reseal, store
from tally_payment_gateway.crypto import SealedToken, TokenVault
from tally_payment_gateway.settings import PaymentGatewaySettings

pytestmark = pytest.mark.integration

MERCHANT = "reseal-tests"
KEYS = {key_id: TokenVault.generate_key() for key_id in ("k1", "k2", "gone")}
BEFORE_ROTATION = TokenVault({"k1": KEYS["k1"]}, "k1")
ROTATED = TokenVault({"k1": KEYS["k1"], "k2": KEYS["k2"]}, "k2")
# The old key retired: only what was resealed still opens.
RETIRED = TokenVault({"k2": KEYS["k2"]}, "k2")


@pytest.fixture(scope="module")
async def merchant(directory: MerchantDirectory) -> str:
    await directory.provision(MERCHANT)
    return MERCHANT


@pytest.fixture(autouse=True)
async def no_saved_methods(directory: MerchantDirectory, merchant: str) -> AsyncIterator[None]:
    yield
    async with directory.transaction(merchant) as conn:
        await conn.execute("DELETE FROM payment_methods WHERE merchant_id = $1", merchant)


def token_of(index: int) -> str:
    return f"15{index:08d}/16{index:08d}"


async def save(directory: MerchantDirectory, vault: TokenVault, count: int) -> dict[UUID, str]:
    """`count` saved methods sealed by `vault`: their tokens by method id."""
    tokens = {uuid.uuid4(): token_of(index) for index in range(count)}
    async with directory.transaction(MERCHANT) as conn:
        for method_id, token in tokens.items():
            await store.insert_payment_method(
                conn,
                store.StoredPaymentMethod(
                    payment_method_id=method_id,
                    merchant_id=MERCHANT,
                    user_id="user-1",
                    provider="authorize_net",
                    label="Visa ending 1111",
                    token=vault.seal(token, associated_data=TokenVault.binding(MERCHANT, method_id)),
                    created_at=datetime.now(UTC),
                ),
            )
    return tokens


async def sealed_rows(directory: MerchantDirectory) -> dict[UUID, SealedToken]:
    async with directory.connection(MERCHANT) as conn:
        rows = await conn.fetch(
            "SELECT payment_method_id, key_id, token_ciphertext FROM payment_methods WHERE merchant_id = $1",
            MERCHANT,
        )
    return {row["payment_method_id"]: SealedToken(row["key_id"], row["token_ciphertext"]) for row in rows}


def opened(vault: TokenVault, rows: dict[UUID, SealedToken]) -> dict[UUID, str]:
    return {
        method_id: vault.unseal(sealed, associated_data=TokenVault.binding(MERCHANT, method_id))
        for method_id, sealed in rows.items()
    }


def job(directory: MerchantDirectory, vault: TokenVault, batch_size: int = 10) -> PeriodicJob[UUID]:
    return reseal.build_job(directory, vault, PaymentGatewaySettings(reseal_batch_size=batch_size))


def resealed_total() -> float:
    return REGISTRY.get_sample_value("tally_payment_tokens_resealed_total") or 0.0


def under_old_key(key_id: str) -> float | None:
    return REGISTRY.get_sample_value("tally_payment_tokens_under_old_keys", {"key_id": key_id})


async def test_tokens_under_an_old_key_move_to_the_active_key_and_open_to_the_same_token(
    directory: MerchantDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    old = await save(directory, BEFORE_ROTATION, 25)
    current = await save(directory, ROTATED, 5)
    untouched = {
        method_id: sealed
        for method_id, sealed in (await sealed_rows(directory)).items()
        if method_id in current
    }
    counted_before = resealed_total()
    caplog.set_level(logging.INFO)

    run = await job(directory, ROTATED, batch_size=10).run_once()

    rows = await sealed_rows(directory)
    assert {sealed.key_id for sealed in rows.values()} == {"k2"}
    assert opened(RETIRED, rows) == old | current
    # Rows already under the active key are not even rewritten.
    assert {method_id: rows[method_id] for method_id in current} == untouched
    assert (run.items, run.failures) == (25, 0)
    assert resealed_total() - counted_before == 25
    assert under_old_key("k1") == 0
    batches = [
        record.claimed  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "tally_kit.jobs" and getattr(record, "merchant_id", None) == MERCHANT
    ]
    assert batches == [10, 10, 5]


async def test_a_run_with_nothing_to_do_changes_nothing(directory: MerchantDirectory) -> None:
    await save(directory, ROTATED, 12)
    before = await sealed_rows(directory)
    counted_before = resealed_total()

    run = await job(directory, ROTATED).run_once()

    assert await sealed_rows(directory) == before
    assert (run.items, run.failures) == (0, 0)
    assert resealed_total() == counted_before


async def test_two_replicas_at_once_reseal_each_row_once(directory: MerchantDirectory) -> None:
    tokens = await save(directory, BEFORE_ROTATION, 120)
    counted_before = resealed_total()

    runs: tuple[JobRun, JobRun] = await asyncio.gather(
        job(directory, ROTATED, batch_size=7).run_once(), job(directory, ROTATED, batch_size=7).run_once()
    )

    rows = await sealed_rows(directory)
    assert opened(RETIRED, rows) == tokens
    # Each row claimed by one replica only: the other skipped it while locked, then no longer
    # found it under the old key.
    assert sum(run.items for run in runs) == 120
    assert sum(run.failures for run in runs) == 0
    assert resealed_total() - counted_before == 120


async def test_rows_another_replica_holds_are_skipped_and_resealed_by_a_later_run(
    directory: MerchantDirectory,
) -> None:
    tokens = await save(directory, BEFORE_ROTATION, 10)
    held = sorted(tokens)[:4]
    async with directory.transaction(MERCHANT) as conn:
        # Another replica's batch, in flight.
        await conn.fetch(
            "SELECT 1 FROM payment_methods WHERE payment_method_id = ANY($1::uuid[]) FOR UPDATE", held
        )
        run = await asyncio.wait_for(job(directory, ROTATED).run_once(), timeout=30)
        assert run.items == 6
    rows = await sealed_rows(directory)
    assert {method_id for method_id, sealed in rows.items() if sealed.key_id == "k1"} == set(held)

    assert (await job(directory, ROTATED).run_once()).items == 4
    assert opened(RETIRED, await sealed_rows(directory)) == tokens


async def test_rows_that_cannot_be_opened_are_reported_and_left_as_they_are(
    directory: MerchantDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    under_unlisted_key = await save(directory, TokenVault({"gone": KEYS["gone"]}, "gone"), 3)
    old = await save(directory, BEFORE_ROTATION, 2)
    # A ciphertext copied into another row: its key is listed, but it is bound to its own row.
    copied_from, altered = sorted(old)
    async with directory.transaction(MERCHANT) as conn:
        await conn.execute(
            """
            UPDATE payment_methods SET token_ciphertext = (
                SELECT token_ciphertext FROM payment_methods WHERE payment_method_id = $1
            ) WHERE payment_method_id = $2
            """,
            copied_from,
            altered,
        )
    before = await sealed_rows(directory)
    caplog.set_level(logging.INFO)

    run = await job(directory, ROTATED).run_once()

    rows = await sealed_rows(directory)
    assert {method_id: rows[method_id] for method_id in [*under_unlisted_key, altered]} == {
        method_id: before[method_id] for method_id in [*under_unlisted_key, altered]
    }
    assert rows[copied_from].key_id == "k2"
    assert opened(RETIRED, {copied_from: rows[copied_from]}) == {copied_from: old[copied_from]}
    assert (run.items, run.failures) == (1, 1)
    assert under_old_key("gone") == 3
    assert under_old_key("k1") == 1
    reports = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any(
        MERCHANT in report and "not configured" in report and "gone: 3" in report for report in reports
    ), reports
    assert any(str(altered) in report for report in reports), reports
