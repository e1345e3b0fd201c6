"""The receipt service's SQL: async functions over one merchant database's connection.

The caller owns the transaction. Every query filters on `merchant_id`, even though each
merchant has a database of its own. Functions return domain objects.

Numbering: `allocate_number` upserts the series counter row, which takes its row lock
until the caller's transaction ends. Another transaction allocating in the same series
waits on that lock, and then reads the committed value (or the old one again if the first
rolled back). A number is therefore handed out once, only after the previous one is
committed with its document or released by a rollback: gapless and without duplicates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from uuid import UUID

import asyncpg
from tally_kit.db.migrations import MigrationSource
from tally_kit.errors import Aborted, NotFound
from tally_kit.pagination import Page, PageRequest, page_of

from tally_receipt.domain import (
    Amounts,
    CreditNote,
    DocumentKind,
    DocumentNumber,
    MerchantSnapshot,
    PostalAddress,
    Receipt,
    ReceiptLine,
    TaxRegime,
    numbering_year,
)

# Applied to every merchant database after the kit's own migrations.
MIGRATIONS = MigrationSource("receipt", Path(__file__).resolve().parent / "migrations")

# Unique constraints a concurrent issuer of the same document can hit first; the loser's
# transaction is rolled back and its event retried, and the retry finds the document.
_CONCURRENT_ISSUE_CONSTRAINTS = frozenset({"receipts_one_per_order", "credit_notes_one_per_refund"})


# --- numbers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    number: DocumentNumber
    # When the document is issued: `now`, or the series' previous issue time if a replica
    # with a clock slightly ahead issued the previous number, so that issue times never go
    # back within a series.
    issued_at: datetime


async def allocate_number(
    conn: asyncpg.Connection, merchant_id: str, kind: DocumentKind, series: str, now: datetime
) -> Allocation:
    """The next number of the series for the year of `now`, locked until the transaction ends.

    The caller must insert the document carrying it in the same transaction (the database
    refuses to commit otherwise).
    """
    if not conn.is_in_transaction():
        raise RuntimeError("a number is allocated in the transaction that issues its document")
    year = numbering_year(now)
    row = await conn.fetchrow(
        """
        INSERT INTO document_series AS s (merchant_id, kind, series, year, last_sequence, last_issued_at)
        VALUES ($1, $2, $3, $4, 1, $5)
        ON CONFLICT (merchant_id, kind, series, year) DO UPDATE
           SET last_sequence = s.last_sequence + 1,
               last_issued_at = greatest(s.last_issued_at, excluded.last_issued_at)
        RETURNING last_sequence, last_issued_at
        """,
        merchant_id,
        kind.value,
        series,
        year,
        now,
    )
    return Allocation(
        number=DocumentNumber(kind=kind, series=series, year=year, sequence=row["last_sequence"]),
        issued_at=row["last_issued_at"],
    )


# --- shared columns -------------------------------------------------------------------------

_MERCHANT_COLUMN_NAMES = (
    "legal_name",
    "tax_id",
    "address_lines",
    "locality",
    "administrative_area",
    "postal_code",
    "region_code",
    "merchant_config_revision",
)
_MERCHANT_COLUMNS = ", ".join(_MERCHANT_COLUMN_NAMES)


def _merchant(row: asyncpg.Record) -> MerchantSnapshot:
    return MerchantSnapshot(
        legal_name=row["legal_name"],
        tax_id=row["tax_id"],
        address=PostalAddress(
            address_lines=tuple(row["address_lines"]),
            locality=row["locality"],
            administrative_area=row["administrative_area"],
            postal_code=row["postal_code"],
            region_code=row["region_code"],
        ),
        config_revision=row["merchant_config_revision"],
    )


def _merchant_values(merchant: MerchantSnapshot) -> tuple[object, ...]:
    address = merchant.address
    return (
        merchant.legal_name,
        merchant.tax_id,
        list(address.address_lines),
        address.locality,
        address.administrative_area,
        address.postal_code,
        address.region_code,
        merchant.config_revision,
    )


def _amounts(row: asyncpg.Record) -> Amounts:
    return Amounts(net=row["net_minor"], tax=row["tax_minor"], gross=row["gross_minor"])


def _number(row: asyncpg.Record, kind: DocumentKind) -> DocumentNumber:
    return DocumentNumber(kind=kind, series=row["series"], year=row["year"], sequence=row["sequence"])


def _raise_if_concurrent_issue(error: asyncpg.UniqueViolationError) -> None:
    if error.constraint_name in _CONCURRENT_ISSUE_CONSTRAINTS:
        raise Aborted(
            "the same document was issued concurrently; retried, it is found",
            reason="CONCURRENT_ISSUE",
        ) from error


# --- receipts -------------------------------------------------------------------------------

_RECEIPT_COLUMNS = f"""
    merchant_id, receipt_id, user_id, order_id, series, year, sequence, issued_at, settled_at,
    currency, tax_rate_percent, prices_include_tax, payment_id, provider_reference, lot_id,
    {_MERCHANT_COLUMNS}
"""


def _receipt(row: asyncpg.Record, lines: Sequence[ReceiptLine]) -> Receipt:
    return Receipt(
        receipt_id=row["receipt_id"],
        merchant_id=row["merchant_id"],
        user_id=row["user_id"],
        order_id=row["order_id"],
        number=_number(row, DocumentKind.RECEIPT),
        issued_at=row["issued_at"],
        settled_at=row["settled_at"],
        currency=row["currency"],
        merchant=_merchant(row),
        tax_regime=TaxRegime(
            rate_percent=row["tax_rate_percent"], prices_include_tax=row["prices_include_tax"]
        ),
        lines=tuple(lines),
        payment_id=row["payment_id"],
        provider_reference=row["provider_reference"],
        lot_id=str(row["lot_id"]),
    )


async def _receipts_with_lines(
    conn: asyncpg.Connection, merchant_id: str, rows: Sequence[asyncpg.Record]
) -> list[Receipt]:
    if not rows:
        return []
    line_rows = await conn.fetch(
        """
        SELECT receipt_id, description, product_id, net_minor, tax_minor, gross_minor
          FROM receipt_lines
         WHERE merchant_id = $1 AND receipt_id = ANY($2::uuid[])
         ORDER BY receipt_id, position
        """,
        merchant_id,
        [row["receipt_id"] for row in rows],
    )
    lines: dict[UUID, list[ReceiptLine]] = defaultdict(list)
    for line in line_rows:
        lines[line["receipt_id"]].append(
            ReceiptLine(
                description=line["description"], product_id=str(line["product_id"]), amounts=_amounts(line)
            )
        )
    return [_receipt(row, lines[row["receipt_id"]]) for row in rows]


async def insert_receipt(conn: asyncpg.Connection, receipt: Receipt) -> None:
    totals = receipt.totals
    try:
        await conn.execute(
            f"""
            INSERT INTO receipts (
                merchant_id, receipt_id, user_id, order_id, series, year, sequence, number,
                issued_at, settled_at, currency, net_minor, tax_minor, gross_minor,
                tax_rate_percent, prices_include_tax, payment_id, provider_reference, lot_id,
                {_MERCHANT_COLUMNS}
            ) VALUES (
                $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
                $20, $21, $22, $23, $24, $25, $26, $27
            )
            """,
            receipt.merchant_id,
            receipt.receipt_id,
            receipt.user_id,
            receipt.order_id,
            receipt.number.series,
            receipt.number.year,
            receipt.number.sequence,
            receipt.number.text,
            receipt.issued_at,
            receipt.settled_at,
            receipt.currency,
            totals.net,
            totals.tax,
            totals.gross,
            receipt.tax_regime.rate_percent,
            receipt.tax_regime.prices_include_tax,
            receipt.payment_id,
            receipt.provider_reference,
            UUID(receipt.lot_id),
            *_merchant_values(receipt.merchant),
        )
    except asyncpg.UniqueViolationError as error:
        _raise_if_concurrent_issue(error)
        raise
    await conn.executemany(
        """
        INSERT INTO receipt_lines (
            merchant_id, receipt_id, position, description, product_id, net_minor, tax_minor, gross_minor
        ) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        """,
        [
            (
                receipt.merchant_id,
                receipt.receipt_id,
                position,
                line.description,
                UUID(line.product_id),
                line.amounts.net,
                line.amounts.tax,
                line.amounts.gross,
            )
            for position, line in enumerate(receipt.lines, start=1)
        ],
    )


async def get_receipt(
    conn: asyncpg.Connection, merchant_id: str, receipt_id: UUID, *, lock: bool = False
) -> Receipt:
    """The receipt; NotFound (RECEIPT_NOT_FOUND). `lock` holds it until the transaction ends."""
    row = await conn.fetchrow(
        f"""
        SELECT {_RECEIPT_COLUMNS} FROM receipts
         WHERE merchant_id = $1 AND receipt_id = $2
        {"FOR UPDATE" if lock else ""}
        """,
        merchant_id,
        receipt_id,
    )
    if row is None:
        raise NotFound(f"receipt {receipt_id} not found", reason="RECEIPT_NOT_FOUND")
    [receipt] = await _receipts_with_lines(conn, merchant_id, [row])
    return receipt


async def find_receipt_of_order(
    conn: asyncpg.Connection, merchant_id: str, order_id: str, *, lock: bool = False
) -> Receipt | None:
    """The order's receipt, if it has one. `lock` holds it until the transaction ends."""
    row = await conn.fetchrow(
        f"""
        SELECT {_RECEIPT_COLUMNS} FROM receipts
         WHERE merchant_id = $1 AND order_id = $2
        {"FOR UPDATE" if lock else ""}
        """,
        merchant_id,
        order_id,
    )
    if row is None:
        return None
    [receipt] = await _receipts_with_lines(conn, merchant_id, [row])
    return receipt


async def list_receipts(
    conn: asyncpg.Connection, merchant_id: str, user_id: str, page: PageRequest
) -> Page[Receipt]:
    """The user's receipts, newest first (by issue time, then id)."""
    after_time, after_id = page.after if page.after is not None else (None, None)
    rows = await conn.fetch(
        f"""
        SELECT {_RECEIPT_COLUMNS} FROM receipts
         WHERE merchant_id = $1 AND user_id = $2
           AND ($3::timestamptz IS NULL OR (issued_at, receipt_id) < ($3, $4::uuid))
         ORDER BY issued_at DESC, receipt_id DESC
         LIMIT $5
        """,
        merchant_id,
        user_id,
        after_time,
        after_id,
        page.size + 1,
    )
    receipts = await _receipts_with_lines(conn, merchant_id, rows)
    return page_of(receipts, page, lambda r: (r.issued_at, r.receipt_id))


# --- credit notes ---------------------------------------------------------------------------

_CREDIT_NOTE_COLUMNS = f"""
    c.merchant_id, c.credit_note_id, c.receipt_id, c.refund_reference, c.series, c.year,
    c.sequence, c.issued_at, c.description, c.currency, c.net_minor, c.tax_minor, c.gross_minor,
    r.user_id, r.order_id, r.number AS receipt_number, r.tax_rate_percent, r.prices_include_tax,
    {", ".join(f"c.{name}" for name in _MERCHANT_COLUMN_NAMES)}
"""

_CREDIT_NOTE_FROM = """
    credit_notes c JOIN receipts r ON r.merchant_id = c.merchant_id AND r.receipt_id = c.receipt_id
"""


def _credit_note(row: asyncpg.Record) -> CreditNote:
    return CreditNote(
        credit_note_id=row["credit_note_id"],
        merchant_id=row["merchant_id"],
        user_id=row["user_id"],
        order_id=row["order_id"],
        receipt_id=row["receipt_id"],
        receipt_number=row["receipt_number"],
        number=_number(row, DocumentKind.CREDIT_NOTE),
        issued_at=row["issued_at"],
        refund_reference=row["refund_reference"],
        currency=row["currency"],
        merchant=_merchant(row),
        tax_regime=TaxRegime(
            rate_percent=row["tax_rate_percent"], prices_include_tax=row["prices_include_tax"]
        ),
        description=row["description"],
        amounts=_amounts(row),
    )


async def insert_credit_note(conn: asyncpg.Connection, note: CreditNote) -> None:
    try:
        await conn.execute(
            f"""
            INSERT INTO credit_notes (
                merchant_id, credit_note_id, receipt_id, refund_reference, series, year, sequence,
                number, issued_at, description, currency, net_minor, tax_minor, gross_minor,
                {_MERCHANT_COLUMNS}
            ) VALUES (
                $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                $15, $16, $17, $18, $19, $20, $21, $22
            )
            """,
            note.merchant_id,
            note.credit_note_id,
            note.receipt_id,
            note.refund_reference,
            note.number.series,
            note.number.year,
            note.number.sequence,
            note.number.text,
            note.issued_at,
            note.description,
            note.currency,
            note.amounts.net,
            note.amounts.tax,
            note.amounts.gross,
            *_merchant_values(note.merchant),
        )
    except asyncpg.UniqueViolationError as error:
        _raise_if_concurrent_issue(error)
        raise


async def get_credit_note(conn: asyncpg.Connection, merchant_id: str, credit_note_id: UUID) -> CreditNote:
    """The credit note; NotFound (CREDIT_NOTE_NOT_FOUND)."""
    row = await conn.fetchrow(
        f"SELECT {_CREDIT_NOTE_COLUMNS} FROM {_CREDIT_NOTE_FROM} "
        "WHERE c.merchant_id = $1 AND c.credit_note_id = $2",
        merchant_id,
        credit_note_id,
    )
    if row is None:
        raise NotFound(f"credit note {credit_note_id} not found", reason="CREDIT_NOTE_NOT_FOUND")
    return _credit_note(row)


async def find_credit_note_of_refund(
    conn: asyncpg.Connection, merchant_id: str, refund_reference: str
) -> CreditNote | None:
    row = await conn.fetchrow(
        f"SELECT {_CREDIT_NOTE_COLUMNS} FROM {_CREDIT_NOTE_FROM} "
        "WHERE c.merchant_id = $1 AND c.refund_reference = $2",
        merchant_id,
        refund_reference,
    )
    return _credit_note(row) if row is not None else None


async def credit_notes_of(conn: asyncpg.Connection, merchant_id: str, receipt_id: UUID) -> list[CreditNote]:
    """The receipt's credit notes, oldest first."""
    rows = await conn.fetch(
        f"SELECT {_CREDIT_NOTE_COLUMNS} FROM {_CREDIT_NOTE_FROM} "
        "WHERE c.merchant_id = $1 AND c.receipt_id = $2 ORDER BY c.issued_at, c.sequence",
        merchant_id,
        receipt_id,
    )
    return [_credit_note(row) for row in rows]
