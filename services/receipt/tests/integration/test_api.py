"""ReceiptService over gRPC as a client sees it: reads, pages, refusals, roles and merchants."""

from __future__ import annotations

import secrets

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tally.receipt.v1 import receipt_service_pb2 as api
from tally_receipt.testing import (
    CALL_TIMEOUT_SECONDS,
    Stack,
    merchant_config,
    new_id,
    new_merchant_id,
    purchase_settled,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def merchant_id(stack: Stack) -> str:
    merchant_id = new_merchant_id("api")
    await stack.catalog.create_merchant(merchant_id, merchant_config(prefix="API"))
    return merchant_id


@pytest.fixture(scope="module")
async def user_with_three_receipts(stack: Stack, merchant_id: str) -> tuple[str, list[str]]:
    """A user and the ids of their receipts, in issue order."""
    user_id = f"user-{secrets.token_hex(4)}"
    receipt_ids = []
    for amount in (100, 200, 300):
        order_id = f"order-{new_id()}"
        await stack.ledger.publish(
            "ledger.purchase_settled",
            purchase_settled(merchant_id, user_id, order_id, amount),
            merchant_id=merchant_id,
        )
        receipt_ids.append(
            (await stack.receipts.wait_for_receipt(merchant_id, user_id, order_id)).receipt.receipt_id
        )
    return user_id, receipt_ids


def reason_and_fields(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    status = rpc_status.from_call(error)
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "receipt.tally"
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields = [violation.field for violation in bad_request.field_violations]
    return reason, fields


async def test_a_user_s_receipts_come_newest_first_page_by_page(
    stack: Stack, merchant_id: str, user_with_three_receipts: tuple[str, list[str]]
) -> None:
    user_id, receipt_ids = user_with_three_receipts
    first = await stack.receipts.list(merchant_id, user_id, page_size=2)
    assert [receipt.receipt_id for receipt in first.receipts] == receipt_ids[:0:-1]
    assert first.next_page_token
    second = await stack.receipts.list(merchant_id, user_id, page_size=2, page_token=first.next_page_token)
    assert [receipt.receipt_id for receipt in second.receipts] == receipt_ids[:1]
    assert second.next_page_token == ""
    numbers = [receipt.sequence for receipt in (*first.receipts, *second.receipts)]
    assert numbers == sorted(numbers, reverse=True)

    # Another user's list has none of them, and refuses this list's token.
    assert list((await stack.receipts.list(merchant_id, "someone-else")).receipts) == []
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.receipts.list(merchant_id, "someone-else", page_token=first.next_page_token)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason_and_fields(refused.value)[1] == ["page_token"]


async def test_unknown_documents_are_not_found(stack: Stack, merchant_id: str) -> None:
    never_seen = new_merchant_id("unseen")
    cases = [
        (stack.receipts.stub.GetReceipt, api.GetReceiptRequest(merchant_id=merchant_id, receipt_id=new_id())),
        (stack.receipts.stub.GetReceipt, api.GetReceiptRequest(merchant_id=never_seen, receipt_id=new_id())),
        (
            stack.receipts.stub.RenderReceiptPdf,
            api.RenderReceiptPdfRequest(merchant_id=merchant_id, receipt_id=new_id()),
        ),
        (
            stack.receipts.stub.RenderCreditNotePdf,
            api.RenderCreditNotePdfRequest(merchant_id=merchant_id, credit_note_id=new_id()),
        ),
    ]
    for method, request in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await method(
                request, metadata=stack.receipts.metadata(None, "platform"), timeout=CALL_TIMEOUT_SECONDS
            )
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        expected = (
            "CREDIT_NOTE_NOT_FOUND"
            if isinstance(request, api.RenderCreditNotePdfRequest)
            else "RECEIPT_NOT_FOUND"
        )
        assert reason_and_fields(refused.value)[0] == expected
    # A merchant without documents yet has none to list.
    response = await stack.receipts.stub.ListReceipts(
        api.ListReceiptsRequest(merchant_id=never_seen, user_id="user-1"),
        metadata=stack.receipts.metadata(never_seen),
        timeout=CALL_TIMEOUT_SECONDS,
    )
    assert list(response.receipts) == []


async def test_bad_requests_name_every_bad_field(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.receipts.stub.GetReceipt(
            api.GetReceiptRequest(merchant_id="Not A Merchant", receipt_id="receipt-1"),
            metadata=stack.receipts.metadata(None, "platform"),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(reason_and_fields(refused.value)[1]) == ["merchant_id", "receipt_id"]
    with pytest.raises(grpc.aio.AioRpcError) as listed:
        await stack.receipts.stub.ListReceipts(
            api.ListReceiptsRequest(merchant_id="shop-1", user_id="", page_size=-1),
            metadata=stack.receipts.metadata(None, "platform"),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    assert sorted(reason_and_fields(listed.value)[1]) == ["page_size", "user_id"]


@pytest.mark.parametrize("role", ["app", "admin", "platform", "service"])
async def test_every_reading_role_reads_receipts(
    stack: Stack, merchant_id: str, user_with_three_receipts: tuple[str, list[str]], role: str
) -> None:
    _, receipt_ids = user_with_three_receipts
    bound = merchant_id if role in ("app", "admin") else None
    response = await stack.receipts.stub.GetReceipt(
        api.GetReceiptRequest(merchant_id=merchant_id, receipt_id=receipt_ids[0]),
        metadata=stack.receipts.metadata(bound, role),
        timeout=CALL_TIMEOUT_SECONDS,
    )
    assert response.receipt.receipt_id == receipt_ids[0]


async def test_another_merchant_s_token_or_none_is_refused(
    stack: Stack, merchant_id: str, user_with_three_receipts: tuple[str, list[str]]
) -> None:
    _, receipt_ids = user_with_three_receipts
    request = api.RenderReceiptPdfRequest(merchant_id=merchant_id, receipt_id=receipt_ids[0])
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await stack.receipts.stub.RenderReceiptPdf(
            request, metadata=stack.receipts.metadata("other-shop"), timeout=CALL_TIMEOUT_SECONDS
        )
    assert foreign.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await stack.receipts.stub.RenderReceiptPdf(request, timeout=CALL_TIMEOUT_SECONDS)
    assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
