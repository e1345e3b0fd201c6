"""Routing keys (`EventEnvelope.event_type`) of the events the receipt service consumes and publishes."""

from __future__ import annotations

# Consumed, from the ledger (`tally/ledger/v1/events.proto`).
PURCHASE_SETTLED = "ledger.purchase_settled"
REFUND_APPLIED = "ledger.refund_applied"

# Published (`tally/receipt/v1/events.proto`).
RECEIPT_ISSUED = "receipt.receipt_issued"
CREDIT_NOTE_ISSUED = "receipt.credit_note_issued"
