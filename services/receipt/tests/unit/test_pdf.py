"""The PDF documents open, and their text shows the number, the merchant and the totals (read with pypdf)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import pytest
from pypdf import PdfReader
from tally_kit.amounts import Money
from tally_receipt import domain, pdf
from tally_receipt.domain import (
    DocumentKind,
    DocumentNumber,
    MerchantProfile,
    MerchantSnapshot,
    PostalAddress,
    Purchase,
    Refund,
    TaxRegime,
)
from tally_receipt.settings import ReceiptSettings

ISSUED = datetime(2030, 3, 14, 9, 26, tzinfo=UTC)


@pytest.fixture(scope="module")
def fonts() -> pdf.Fonts:
    settings = ReceiptSettings()
    fonts = pdf.Fonts(regular=Path(settings.pdf_font_file), bold=Path(settings.pdf_bold_font_file))
    fonts.check()
    return fonts


def profile(legal_name: str = "Acme SAS", rate: str = "20", include: bool = True) -> MerchantProfile:
    return MerchantProfile(
        merchant=MerchantSnapshot(
            legal_name=legal_name,
            tax_id="FR40303265045",
            address=PostalAddress(
                ("1 rue de la Paix", "Bâtiment B"), "Paris", "Île-de-France", "75002", "FR"
            ),
            config_revision=1,
        ),
        series_prefix="ACME",
        tax_regime=TaxRegime(rate_percent=Decimal(rate), prices_include_tax=include),
    )


def receipt(merchant: MerchantProfile, amount: Money) -> domain.Receipt:
    return domain.new_receipt(
        Purchase(
            merchant_id="acme",
            user_id="user-42",
            order_id="order-7",
            product_id=str(uuid4()),
            product_name="Starter pack — 100 credits",
            amount_paid=amount,
            payment_id="",
            provider_reference="psp-9",
            lot_id=str(uuid4()),
            settled_at=ISSUED - timedelta(minutes=1),
        ),
        merchant,
        receipt_id=uuid4(),
        number=DocumentNumber(DocumentKind.RECEIPT, "ACME", 2030, 42),
        issued_at=ISSUED,
    )


def text_of(document: bytes) -> str:
    assert document.startswith(b"%PDF-")
    reader = PdfReader(io.BytesIO(document))
    assert len(reader.pages) == 1
    return "\n".join(page.extract_text() for page in reader.pages)


def test_a_receipt_shows_its_number_merchant_lines_and_totals(fonts: pdf.Fonts) -> None:
    issued = receipt(profile(), Money(123456, "EUR"))
    text = text_of(pdf.render_receipt(issued, fonts))

    for expected in (
        "Receipt ACME-2030-000042",
        "Acme SAS",
        "Tax ID: FR40303265045",
        "1 rue de la Paix",
        "75002 Paris",
        "order-7",
        "2030-03-14 09:26 UTC",
        "Starter pack — 100 credits",
        "Net total",
        "1,028.80 EUR",
        "205.76 EUR",
        "1,234.56 EUR",
        "Prices include 20 % tax.",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_any_legal_name_prints_as_it_is(fonts: pdf.Fonts) -> None:
    issued = receipt(profile(legal_name="Zürich Łódź Ελλάς GmbH"), Money(1000, "EUR"))
    assert "Zürich Łódź Ελλάς GmbH" in text_of(pdf.render_receipt(issued, fonts))


@pytest.mark.parametrize(
    ("amount", "regime", "shown"),
    [
        (Money(1100, "JPY"), ("10", True), ["1,000 JPY", "100 JPY", "1,100 JPY"]),
        (
            Money(2462, "KWD"),
            ("5", False),
            ["2.345 KWD", "0.117 KWD", "2.462 KWD", "5 % tax is added to prices."],
        ),
    ],
)
def test_amounts_show_the_currency_s_minor_digits(
    fonts: pdf.Fonts, amount: Money, regime: tuple[str, bool], shown: list[str]
) -> None:
    issued = receipt(profile(rate=regime[0], include=regime[1]), amount)
    text = text_of(pdf.render_receipt(issued, fonts))
    for expected in shown:
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_a_credit_note_names_its_receipt_and_the_amount_refunded(fonts: pdf.Fonts) -> None:
    issued = receipt(profile(), Money(1000, "EUR"))
    note = domain.new_credit_note(
        issued,
        Refund("acme", "user-42", "order-7", "refund-3", Money(400, "EUR")),
        credited_before=0,
        merchant=issued.merchant,
        credit_note_id=uuid4(),
        number=DocumentNumber(DocumentKind.CREDIT_NOTE, "ACME", 2030, 3),
        issued_at=ISSUED + timedelta(days=2),
    )
    text = text_of(pdf.render_credit_note(note, fonts))
    for expected in (
        "Credit note ACME-2030-CN000003",
        "Acme SAS",
        "ACME-2030-000042",
        "refund-3",
        "3.33 EUR",
        "0.67 EUR",
        "4.00 EUR",
        "Total refunded",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_the_same_document_renders_to_the_same_bytes(fonts: pdf.Fonts) -> None:
    issued = receipt(profile(), Money(1000, "EUR"))
    assert pdf.render_receipt(issued, fonts) == pdf.render_receipt(issued, fonts)
    assert pdf.file_name(issued.number.text) == "ACME-2030-000042.pdf"


def test_a_missing_font_is_found_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pdf.Fonts(regular=tmp_path / "none.ttf", bold=tmp_path / "none-bold.ttf").check()
