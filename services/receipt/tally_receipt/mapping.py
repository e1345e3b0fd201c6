"""Domain objects -> `tally.receipt.v1` messages."""

from __future__ import annotations

from tally.common.v1.money_pb2 import Money
from tally.receipt.v1 import resources_pb2 as res
from tally_kit.amounts import format_decimal
from tally_kit.protobuf import timestamp

from tally_receipt.domain import Amounts, CreditNote, MerchantSnapshot, Receipt, TaxRegime


def amounts(values: Amounts, currency: str) -> res.Amounts:
    return res.Amounts(
        net=Money(amount_minor=values.net, currency=currency),
        tax=Money(amount_minor=values.tax, currency=currency),
        gross=Money(amount_minor=values.gross, currency=currency),
    )


def merchant(snapshot: MerchantSnapshot) -> res.MerchantSnapshot:
    address = snapshot.address
    return res.MerchantSnapshot(
        legal_name=snapshot.legal_name,
        tax_id=snapshot.tax_id,
        address=res.PostalAddress(
            address_lines=list(address.address_lines),
            locality=address.locality,
            administrative_area=address.administrative_area,
            postal_code=address.postal_code,
            region_code=address.region_code,
        ),
        config_revision=snapshot.config_revision,
    )


def tax_regime(regime: TaxRegime) -> res.TaxRegime:
    return res.TaxRegime(
        rate_percent=format_decimal(regime.rate_percent), prices_include_tax=regime.prices_include_tax
    )


def receipt(value: Receipt) -> res.Receipt:
    return res.Receipt(
        receipt_id=str(value.receipt_id),
        merchant_id=value.merchant_id,
        user_id=value.user_id,
        order_id=value.order_id,
        number=value.number.text,
        series=value.number.series,
        year=value.number.year,
        sequence=value.number.sequence,
        issue_time=timestamp(value.issued_at),
        settle_time=timestamp(value.settled_at),
        merchant=merchant(value.merchant),
        tax_regime=tax_regime(value.tax_regime),
        lines=[
            res.ReceiptLine(
                description=line.description,
                product_id=line.product_id,
                amounts=amounts(line.amounts, value.currency),
            )
            for line in value.lines
        ],
        totals=amounts(value.totals, value.currency),
        payment_id=value.payment_id,
        provider_reference=value.provider_reference,
        lot_id=value.lot_id,
    )


def credit_note(value: CreditNote) -> res.CreditNote:
    return res.CreditNote(
        credit_note_id=str(value.credit_note_id),
        merchant_id=value.merchant_id,
        user_id=value.user_id,
        order_id=value.order_id,
        receipt_id=str(value.receipt_id),
        receipt_number=value.receipt_number,
        number=value.number.text,
        series=value.number.series,
        year=value.number.year,
        sequence=value.number.sequence,
        issue_time=timestamp(value.issued_at),
        refund_reference=value.refund_reference,
        merchant=merchant(value.merchant),
        tax_regime=tax_regime(value.tax_regime),
        description=value.description,
        amounts=amounts(value.amounts, value.currency),
    )
