"""No card data ever gets in: a card number or a labelled security code anywhere in a request, or a
field the API does not define, is refused before anything is stored, and the value appears in
no log line and no error. Saved payment methods are kept encrypted and charge like any token.
Bad input is refused field by field; merchants without a provider account are refused."""

from __future__ import annotations

import logging
import uuid

import grpc
import pytest
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as api
from tally.payment_gateway.v1 import resources_pb2 as res
from tally_payment_gateway.testing import Gateway, new_id, usd

from .conftest import CARDS, MAIN, SPARE

VISA = "4111111111111111"
VISA_GROUPED = "4111 1111 1111 1111"
CVV = "737"


@pytest.fixture(autouse=True)
async def cards_database(gateway: Gateway) -> None:
    """The card tests' merchant has a database, so every test can compare it before and after."""
    await gateway.wiring.directory.provision(CARDS)


def _with_unknown_field(request: api.PurchaseRequest, number: int, text: str) -> bytes:
    """The request's bytes plus a string field `number` the API does not define."""
    payload = text.encode()
    tag = (number << 3) | 2
    varint = bytearray()
    while True:
        byte, tag = tag & 0x7F, tag >> 7
        varint.append(byte | (0x80 if tag else 0))
        if not tag:
            break
    return request.SerializeToString() + bytes(varint) + bytes([len(payload)]) + payload


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: setattr(r, "description", f"card {VISA_GROUPED} exp 12/30"), "description"),
        (lambda r: setattr(r, "order_id", f"order-{VISA}"), "order_id"),
        (
            lambda r: r.payment_source.one_time_token.__setattr__("value", VISA),
            "payment_source.one_time_token.value",
        ),
        (lambda r: setattr(r, "description", f"CVV: {CVV}"), "description"),
        (
            lambda r: r.payment_source.one_time_token.__setattr__("value", f'{{"cardCode":"{CVV}"}}'),
            "payment_source.one_time_token.value",
        ),
    ],
    ids=[
        "number-in-description",
        "number-in-order-id",
        "number-as-token",
        "cvv-in-description",
        "cvv-in-token",
    ],
)
async def test_a_request_carrying_card_data_is_refused_and_nothing_is_kept(
    gateway: Gateway, caplog: pytest.LogCaptureFixture, change, field: str
) -> None:
    caplog.set_level(logging.DEBUG)
    request = gateway.purchase_request(CARDS)
    change(request)
    before = await gateway.databases.snapshot(CARDS)
    refusal = await gateway.refuse("Purchase", request)
    assert (refusal.code, refusal.reason, refusal.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "CARD_DATA_NOT_ACCEPTED",
        (field,),
    )
    assert await gateway.databases.snapshot(CARDS) == before
    secret = VISA if CVV not in request.description + request.payment_source.one_time_token.value else CVV
    assert secret not in refusal.message
    _assert_not_logged(caplog, [VISA, VISA_GROUPED, f"CVV: {CVV}", f'"cardCode":"{CVV}"'])


async def test_a_uuid_whose_digits_line_up_like_a_card_number_is_no_card_number(gateway: Gateway) -> None:
    # "b374-642577194837" reads as the Amex number 374642577194837 (Luhn-valid); about one
    # random UUID in a thousand has such a run.
    request = gateway.purchase_request(MAIN)
    request.product_id = "ad93b86b-76ca-4e79-b374-642577194837"
    payment = (await gateway.call("Purchase", request)).payment
    assert (payment.state, payment.product_id) == (res.PAYMENT_STATE_CAPTURED, request.product_id)


async def test_a_field_the_api_does_not_define_is_refused(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    raw = _with_unknown_field(gateway.purchase_request(CARDS), 99, VISA)
    before = await gateway.databases.snapshot(CARDS)
    call = gateway.channel.unary_unary(
        "/tally.payment_gateway.v1.PaymentGatewayService/Purchase",
        request_serializer=lambda data: data,
        response_deserializer=api.PurchaseResponse.FromString,
    )
    metadata = (("authorization", f"Bearer {gateway.token('platform')}"),)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(raw, metadata=metadata, timeout=10)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert VISA not in (refused.value.details() or "")
    assert await gateway.databases.snapshot(CARDS) == before
    _assert_not_logged(caplog, [VISA])


async def test_a_refused_request_of_a_new_merchant_creates_nothing(gateway: Gateway) -> None:
    # A merchant with an account but no database yet: the refusal must not create one.
    databases = await gateway.databases.databases()
    assert gateway.databases.merchant_database(SPARE) not in databases
    request = gateway.purchase_request(SPARE)
    request.description = VISA
    assert (await gateway.refuse("Purchase", request)).reason == "CARD_DATA_NOT_ACCEPTED"
    assert await gateway.databases.databases() == databases


async def test_a_saved_payment_method_is_kept_encrypted_and_charges(gateway: Gateway) -> None:
    token = f"1512345678/sim-approve-{uuid.uuid4().hex[:8]}"
    saved = await gateway.call(
        "SavePaymentMethod",
        api.SavePaymentMethodRequest(
            merchant_id=MAIN,
            request_id=new_id(),
            user_id="user-1",
            provider_token=token,
            label="Visa ending 1111",
        ),
    )
    method = saved.payment_method
    assert (method.user_id, method.provider, method.label) == ("user-1", "authorize_net", "Visa ending 1111")
    assert token not in str(saved)
    [row] = await gateway.databases.fetch(
        MAIN,
        "SELECT key_id, token_ciphertext FROM payment_methods WHERE payment_method_id = $1",
        uuid.UUID(method.payment_method_id),
    )
    assert row["key_id"] == gateway.settings.token_encryption_active_key_id
    assert token.encode() not in row["token_ciphertext"]
    assert b"sim-approve" not in row["token_ciphertext"]
    payment = await gateway.purchase(
        MAIN, source=api.PaymentSource(payment_method_id=method.payment_method_id), amount_minor=999
    )
    assert payment.state == res.PAYMENT_STATE_CAPTURED
    assert payment.payment_method_id == method.payment_method_id
    # The simulator was charged with the saved profile the token names.
    [charge] = await gateway.simulator.transactions(payment.provider_order_reference)
    assert charge["transId"] == payment.provider_reference


async def test_a_saved_method_charges_only_its_own_user(gateway: Gateway) -> None:
    saved = await gateway.call(
        "SavePaymentMethod",
        api.SavePaymentMethodRequest(
            merchant_id=MAIN, request_id=new_id(), user_id="user-2", provider_token="1512345678/1512987654"
        ),
    )
    request = gateway.purchase_request(
        MAIN, source=api.PaymentSource(payment_method_id=saved.payment_method.payment_method_id)
    )
    refusal = await gateway.refuse("Purchase", request)
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.NOT_FOUND, "PAYMENT_METHOD_NOT_FOUND")


async def test_a_declining_saved_method_fails_the_purchase(gateway: Gateway) -> None:
    saved = await gateway.call(
        "SavePaymentMethod",
        api.SavePaymentMethodRequest(
            merchant_id=MAIN, request_id=new_id(), user_id="user-1", provider_token="1512345678/sim-decline-1"
        ),
    )
    payment = await gateway.purchase(
        MAIN, source=api.PaymentSource(payment_method_id=saved.payment_method.payment_method_id)
    )
    assert (payment.state, payment.failure_code) == (res.PAYMENT_STATE_FAILED, "DECLINED")


async def test_bad_input_is_refused_field_by_field(gateway: Gateway) -> None:
    purchase = api.PurchaseRequest(
        merchant_id=MAIN,
        request_id="has spaces",
        user_id="",
        order_id="order 1",
        product_id="not-a-uuid",
        amount=usd(0),
        description="x" * 256,
    )
    refusal = await gateway.refuse("Purchase", purchase)
    assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT
    assert set(refusal.fields) == {
        "request_id",
        "user_id",
        "order_id",
        "product_id",
        "amount.amount_minor",
        "payment_source",
        "description",
    }
    token = await gateway.refuse(
        "SavePaymentMethod",
        api.SavePaymentMethodRequest(
            merchant_id=MAIN, request_id=new_id(), user_id="user-1", provider_token="nope"
        ),
    )
    assert token.fields == ("provider_token",)
    listing = await gateway.refuse(
        "ListPayments", api.ListPaymentsRequest(merchant_id=MAIN, page_size=-1, state=42)
    )
    assert set(listing.fields) == {"page_size", "state"}
    missing = await gateway.refuse(
        "GetPayment", api.GetPaymentRequest(merchant_id=MAIN, payment_id=str(uuid.uuid4()))
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND")


async def test_a_merchant_without_a_provider_account_is_refused_and_gets_no_database(
    gateway: Gateway,
) -> None:
    databases = await gateway.databases.databases()
    refusal = await gateway.refuse("Purchase", gateway.purchase_request("no-account"))
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_NOT_CONFIGURED")
    listed = await gateway.call("ListPayments", api.ListPaymentsRequest(merchant_id="no-account"))
    assert list(listed.payments) == []
    assert await gateway.databases.databases() == databases


async def test_an_app_token_reaches_its_own_merchant_only(gateway: Gateway) -> None:
    payment = await gateway.purchase(MAIN)
    request = api.GetPaymentRequest(merchant_id=MAIN, payment_id=payment.payment_id)
    own = await gateway.call("GetPayment", request, role="app", merchant_id=MAIN)
    assert own.payment == payment
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await gateway.call("GetPayment", request, role="app", merchant_id="quiet-merchant")
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED


def _assert_not_logged(caplog: pytest.LogCaptureFixture, secrets: list[str]) -> None:
    for record in caplog.records:
        text = " ".join([record.getMessage(), *(str(value) for value in vars(record).values())])
        for secret in secrets:
            assert secret not in text, f"{record.name} logged card data"
