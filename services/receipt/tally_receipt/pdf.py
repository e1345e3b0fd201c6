"""Receipts and credit notes as PDF documents, drawn with fpdf2.

A document shows the merchant's legal name, address and tax id as snapshotted when it was
issued, its number and dates, its lines and its net, tax and gross totals. Amounts are
formatted from minor units with integer arithmetic (`domain.format_money`), never through
a float. Text is set in a TrueType font, so any legal name or address prints as it is.

Rendering takes tens of milliseconds of CPU: callers in the event loop run it in a thread.
The output is the same for the same document (its creation date is its issue time).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fpdf import FPDF
from fpdf.enums import Align, XPos, YPos
from tally_kit.amounts import format_decimal

from tally_receipt.domain import Amounts, CreditNote, MerchantSnapshot, Receipt, TaxRegime, format_money

_FAMILY = "TallyDocument"
_CREATOR = "Tally receipt service"
_LINE_HEIGHT = 6.0
_TABLE_COLUMNS = ("Description", "Net", "Tax", "Gross")
_TABLE_WIDTHS = (85, 35, 35, 35)
_TABLE_ALIGN = ("LEFT", "RIGHT", "RIGHT", "RIGHT")


@dataclass(frozen=True)
class Fonts:
    """The TrueType files documents are set in."""

    regular: Path
    bold: Path

    def check(self) -> None:
        """Fail at start-up, not at the first document, when a font file is missing."""
        for path in (self.regular, self.bold):
            if not path.is_file():
                raise FileNotFoundError(f"PDF font file {path} does not exist")


def render_receipt(receipt: Receipt, fonts: Fonts) -> bytes:
    document = _Document(fonts, title=f"Receipt {receipt.number.text}", issued_at=receipt.issued_at)
    document.heading("Receipt", receipt.number.text, receipt.merchant)
    document.facts(
        [
            ("Receipt number", receipt.number.text),
            ("Issued", _when(receipt.issued_at)),
            ("Order", receipt.order_id),
            ("Order settled", _when(receipt.settled_at)),
            ("Customer", receipt.user_id),
            ("Payment reference", receipt.provider_reference),
        ]
    )
    document.lines(
        [(line.description, line.amounts) for line in receipt.lines], receipt.currency, receipt.tax_regime
    )
    document.totals(receipt.totals, receipt.currency, receipt.tax_regime, gross_label="Total paid")
    document.note(_regime_text(receipt.tax_regime))
    return document.output()


def render_credit_note(note: CreditNote, fonts: Fonts) -> bytes:
    document = _Document(fonts, title=f"Credit note {note.number.text}", issued_at=note.issued_at)
    document.heading("Credit note", note.number.text, note.merchant)
    document.facts(
        [
            ("Credit note number", note.number.text),
            ("Issued", _when(note.issued_at)),
            ("Refers to receipt", note.receipt_number),
            ("Order", note.order_id),
            ("Customer", note.user_id),
            ("Refund reference", note.refund_reference),
        ]
    )
    document.lines([(note.description, note.amounts)], note.currency, note.tax_regime)
    document.totals(note.amounts, note.currency, note.tax_regime, gross_label="Total refunded")
    document.note(
        f"This credit note cancels {format_money(note.amounts.gross, note.currency)} "
        f"of receipt {note.receipt_number}. {_regime_text(note.tax_regime)}"
    )
    return document.output()


def file_name(number: str) -> str:
    return f"{number}.pdf"


class _Document:
    def __init__(self, fonts: Fonts, *, title: str, issued_at: datetime) -> None:
        pdf = FPDF(format="A4")
        pdf.add_font(_FAMILY, "", str(fonts.regular))
        pdf.add_font(_FAMILY, "B", str(fonts.bold))
        pdf.set_title(title)
        pdf.set_creator(_CREATOR)
        pdf.set_creation_date(issued_at)
        pdf.set_auto_page_break(auto=True, margin=15)
        pdf.add_page()
        self._pdf = pdf

    def heading(self, kind: str, number: str, merchant: MerchantSnapshot) -> None:
        pdf = self._pdf
        pdf.set_font(_FAMILY, "B", 16)
        pdf.cell(text=merchant.legal_name, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_font(_FAMILY, "", 10)
        address = merchant.address
        place = " ".join(part for part in (address.postal_code, address.locality) if part)
        for text in (*address.address_lines, place, address.administrative_area, address.region_code):
            if text:
                pdf.cell(text=text, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.cell(text=f"Tax ID: {merchant.tax_id}", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.ln(_LINE_HEIGHT)
        pdf.set_font(_FAMILY, "B", 14)
        pdf.cell(text=f"{kind} {number}", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.ln(2)

    def facts(self, rows: list[tuple[str, str]]) -> None:
        pdf = self._pdf
        for label, value in rows:
            if not value:
                continue
            pdf.set_font(_FAMILY, "B", 10)
            pdf.cell(w=45, h=_LINE_HEIGHT, text=label)
            pdf.set_font(_FAMILY, "", 10)
            pdf.multi_cell(w=0, h=_LINE_HEIGHT, text=value, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.ln(_LINE_HEIGHT)

    def lines(self, rows: list[tuple[str, Amounts]], currency: str, regime: TaxRegime) -> None:
        pdf = self._pdf
        pdf.set_font(_FAMILY, "", 10)
        headings = list(_TABLE_COLUMNS)
        headings[2] = f"Tax ({format_decimal(regime.rate_percent)} %)"
        with pdf.table(col_widths=_TABLE_WIDTHS, text_align=_TABLE_ALIGN, line_height=_LINE_HEIGHT) as table:
            table.row(headings)
            for description, amounts in rows:
                table.row(
                    [
                        description,
                        format_money(amounts.net, currency),
                        format_money(amounts.tax, currency),
                        format_money(amounts.gross, currency),
                    ]
                )
        pdf.ln(_LINE_HEIGHT)

    def totals(self, totals: Amounts, currency: str, regime: TaxRegime, *, gross_label: str) -> None:
        pdf = self._pdf
        rows = (
            ("Net total", totals.net, ""),
            (f"Tax {format_decimal(regime.rate_percent)} %", totals.tax, ""),
            (gross_label, totals.gross, "B"),
        )
        for label, amount, style in rows:
            pdf.set_font(_FAMILY, style, 11)
            pdf.cell(w=120, h=_LINE_HEIGHT + 1, text=label, align=Align.R)
            pdf.cell(
                w=0,
                h=_LINE_HEIGHT + 1,
                text=format_money(amount, currency),
                align=Align.R,
                new_x=XPos.LMARGIN,
                new_y=YPos.NEXT,
            )
        pdf.ln(_LINE_HEIGHT)

    def note(self, text: str) -> None:
        pdf = self._pdf
        pdf.set_font(_FAMILY, "", 9)
        pdf.multi_cell(w=0, h=5, text=text, new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def output(self) -> bytes:
        return bytes(self._pdf.output())


def _when(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _regime_text(regime: TaxRegime) -> str:
    rate = format_decimal(regime.rate_percent)
    if regime.prices_include_tax:
        return f"Prices include {rate} % tax."
    return f"{rate} % tax is added to prices."
