"""Bad input on every RPC: refused with INVALID_ARGUMENT naming every bad field, before any
database is touched, so that nothing is written (not even the idempotency key)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.message import Message
from ledger_harness import new_id, new_user, refusal, snapshot
from tally.common.v1.money_pb2 import Credits, Money
from tally.ledger.v1 import ledger_service_pb2 as api
from tally.ledger.v1 import resources_pb2 as res
from tally_kit.db.directory import MerchantDirectory
from tally_kit.errors import InvalidArgument
from tally_ledger.servicer import LedgerServicer

pytestmark = pytest.mark.integration

UUID_TEXT = "0b6f3c1e-8f0a-4c5e-9a51-2f4f1c9e7d10"

# Each RPC with a request breaking several fields at once, and the fields its refusal names.
BadRequest = Callable[[str], Message]
CASES: dict[str, tuple[BadRequest, list[str]]] = {
    "RegisterUser": (
        lambda m: api.RegisterUserRequest(merchant_id="Bad_Merchant", request_id="", user_id="has space"),
        ["merchant_id", "request_id", "user_id"],
    ),
    "SettlePurchase": (
        lambda m: api.SettlePurchaseRequest(
            merchant_id=m,
            request_id=new_id(),
            order_id="",
            user_id="user-1",
            product_id="not-a-uuid",
            amount_paid=Money(amount_minor=-1, currency="euro"),
            provider_reference="",
        ),
        ["order_id", "product_id", "amount_paid.amount_minor", "amount_paid.currency", "provider_reference"],
    ),
    "GrantCredits": (
        lambda m: api.GrantCreditsRequest(
            merchant_id=m,
            request_id=new_id(),
            user_id="user-1",
            grant_key="signup:mine",
            custom=api.CustomGrant(credits=Credits(value="1.0000001")),
            source=res.LOT_SOURCE_PURCHASE,
        ),
        ["grant_key", "custom.credits.value", "source"],
    ),
    "OpenOperation": (
        lambda m: api.OpenOperationRequest(
            merchant_id=m,
            request_id=new_id(),
            user_id="",
            operation_code="LLM Tokens",
            workflow_id="has space",
        ),
        ["user_id", "operation_code", "workflow_id"],
    ),
    "RecordAndCloseOperation": (
        lambda m: api.RecordAndCloseOperationRequest(
            merchant_id=m, request_id=new_id(), operation_id="42", resource_amount="-1"
        ),
        ["operation_id", "resource_amount"],
    ),
    "CancelOperation": (
        lambda m: api.CancelOperationRequest(merchant_id=m, request_id="has space", operation_id=""),
        ["request_id", "operation_id"],
    ),
    "GetOperation": (
        lambda m: api.GetOperationRequest(merchant_id="", operation_id=UUID_TEXT.upper() + "0"),
        ["merchant_id", "operation_id"],
    ),
    "ApplyRefund": (
        lambda m: api.ApplyRefundRequest(
            merchant_id=m,
            request_id=new_id(),
            order_id="order 1",
            refund_reference="",
            amount_refunded=Money(amount_minor=0, currency="EUR"),
            reason="\x00",
        ),
        ["order_id", "refund_reference", "amount_refunded.amount_minor", "reason"],
    ),
    "ApplyChargeback": (
        lambda m: api.ApplyChargebackRequest(
            merchant_id=m, request_id=new_id(), order_id="order-1", chargeback_reference="x" * 201
        ),
        ["chargeback_reference", "amount"],
    ),
    "ApplyAdjustment": (
        lambda m: api.ApplyAdjustmentRequest(
            merchant_id=m,
            request_id=new_id(),
            user_id="user-1",
            amount=Credits(value="0"),
            reason="",
            actor="x" * 201,
        ),
        ["amount.value", "reason", "actor"],
    ),
    "GetBalance": (
        lambda m: api.GetBalanceRequest(merchant_id=m, user_id="a/b", read_time={"seconds": 10**12}),
        ["user_id", "read_time"],
    ),
    "ListLots": (
        lambda m: api.ListLotsRequest(
            merchant_id=m,
            user_id="user-1",
            page_size=-1,
            page_token="not-a-page-token",
            states=[res.LOT_STATE_ACTIVE, 99],
        ),
        ["states[1]", "page_size", "page_token"],
    ),
    "GetLedgerHistory": (
        lambda m: api.GetLedgerHistoryRequest(
            merchant_id=m,
            user_id="user-1",
            kinds=[42],
            start_time={"seconds": 2_000_000_000},
            end_time={"seconds": 1_900_000_000},
            workflow_id=" ",
        ),
        ["kinds[0]", "end_time", "workflow_id"],
    ),
}


def test_every_rpc_has_a_case() -> None:
    assert set(CASES) == set(api.DESCRIPTOR.services_by_name["LedgerService"].methods_by_name)


@pytest.fixture(scope="module")
async def provisioned(servicer: LedgerServicer, merchant_id: str) -> str:
    """The module's merchant with its database created and one user registered."""
    request = api.RegisterUserRequest(merchant_id=merchant_id, request_id=new_id(), user_id=new_user())
    await servicer.RegisterUser(request, None)
    return merchant_id


@pytest.mark.parametrize("rpc", list(CASES))
async def test_bad_input_names_every_bad_field_and_writes_nothing(
    servicer: LedgerServicer, directory: MerchantDirectory, provisioned: str, rpc: str
) -> None:
    bad_request, fields = CASES[rpc]
    before = await snapshot(directory, provisioned)
    refused = await refusal(getattr(servicer, rpc)(bad_request(provisioned), None))
    assert isinstance(refused, InvalidArgument) and refused.reason == "INVALID_ARGUMENT"
    assert sorted(v.field for v in refused.violations) == sorted(fields)
    assert await snapshot(directory, provisioned) == before


async def test_a_grant_names_what_it_grants(servicer: LedgerServicer, provisioned: str) -> None:
    request = api.GrantCreditsRequest(
        merchant_id=provisioned, request_id=new_id(), user_id="user-1", grant_key="k-1"
    )
    refused = await refusal(servicer.GrantCredits(request, None))
    assert isinstance(refused, InvalidArgument) and [v.field for v in refused.violations] == ["grant"]
    request.custom.CopyFrom(api.CustomGrant(credits=Credits(value="5")))
    refused = await refusal(servicer.GrantCredits(request, None))
    assert isinstance(refused, InvalidArgument) and [v.field for v in refused.violations] == ["source"]
