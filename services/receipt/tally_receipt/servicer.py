"""The ReceiptService gRPC servicer: reads receipts and credit notes, and renders them as PDF.

Every method validates its request first (bad input never reaches a database), then reads
through the merchant directory. Documents are only ever issued by the event handlers.
A merchant the service has not seen an event of has no database here yet: it has no
documents, so its lists are empty and its documents not found.
"""

from __future__ import annotations

import asyncio

import grpc
from tally.receipt.v1 import receipt_service_pb2 as api
from tally.receipt.v1 import receipt_service_pb2_grpc
from tally_kit.db.directory import MerchantDirectory
from tally_kit.errors import NotFound

from tally_receipt import mapping, pdf, store, validation

SERVICE_NAME = api.DESCRIPTOR.services_by_name["ReceiptService"].full_name


class ReceiptServicer(receipt_service_pb2_grpc.ReceiptServiceServicer):
    def __init__(self, directory: MerchantDirectory, fonts: pdf.Fonts) -> None:
        self._directory = directory
        self._fonts = fonts

    async def GetReceipt(
        self, request: api.GetReceiptRequest, context: grpc.aio.ServicerContext
    ) -> api.GetReceiptResponse:
        ref = validation.receipt_ref(request)
        await self._require_documents(ref.merchant_id, "RECEIPT_NOT_FOUND", f"receipt {ref.receipt_id}")
        async with self._directory.connection(ref.merchant_id) as conn:
            receipt = await store.get_receipt(conn, ref.merchant_id, ref.receipt_id)
            notes = await store.credit_notes_of(conn, ref.merchant_id, ref.receipt_id)
        return api.GetReceiptResponse(
            receipt=mapping.receipt(receipt), credit_notes=[mapping.credit_note(note) for note in notes]
        )

    async def ListReceipts(
        self, request: api.ListReceiptsRequest, context: grpc.aio.ServicerContext
    ) -> api.ListReceiptsResponse:
        query = validation.list_receipts(request)
        if not await self._directory.is_provisioned(query.merchant_id):
            return api.ListReceiptsResponse()
        async with self._directory.connection(query.merchant_id) as conn:
            page = await store.list_receipts(conn, query.merchant_id, query.user_id, query.page)
        return api.ListReceiptsResponse(
            receipts=[mapping.receipt(receipt) for receipt in page.items],
            next_page_token=page.next_page_token,
        )

    async def RenderReceiptPdf(
        self, request: api.RenderReceiptPdfRequest, context: grpc.aio.ServicerContext
    ) -> api.RenderReceiptPdfResponse:
        ref = validation.receipt_ref(request)
        await self._require_documents(ref.merchant_id, "RECEIPT_NOT_FOUND", f"receipt {ref.receipt_id}")
        async with self._directory.connection(ref.merchant_id) as conn:
            receipt = await store.get_receipt(conn, ref.merchant_id, ref.receipt_id)
        document = await asyncio.to_thread(pdf.render_receipt, receipt, self._fonts)
        return api.RenderReceiptPdfResponse(pdf=document, file_name=pdf.file_name(receipt.number.text))

    async def RenderCreditNotePdf(
        self, request: api.RenderCreditNotePdfRequest, context: grpc.aio.ServicerContext
    ) -> api.RenderCreditNotePdfResponse:
        ref = validation.credit_note_ref(request)
        await self._require_documents(
            ref.merchant_id, "CREDIT_NOTE_NOT_FOUND", f"credit note {ref.credit_note_id}"
        )
        async with self._directory.connection(ref.merchant_id) as conn:
            note = await store.get_credit_note(conn, ref.merchant_id, ref.credit_note_id)
        document = await asyncio.to_thread(pdf.render_credit_note, note, self._fonts)
        return api.RenderCreditNotePdfResponse(pdf=document, file_name=pdf.file_name(note.number.text))

    async def _require_documents(self, merchant_id: str, reason: str, what: str) -> None:
        """NotFound for the document asked about when the merchant has no documents at all."""
        if not await self._directory.is_provisioned(merchant_id):
            raise NotFound(f"{what} not found", reason=reason)
