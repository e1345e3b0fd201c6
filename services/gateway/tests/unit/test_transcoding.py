"""HTTP ⇄ protobuf for the real routes (AIP-127), and the gRPC → HTTP status table."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from tally.catalog.v1 import catalog_service_pb2 as catalog_api
from tally.catalog.v1 import resources_pb2 as catalog_res
from tally.common.v1 import access_pb2
from tally.ledger.v1 import ledger_service_pb2 as ledger_api
from tally.ledger.v1 import resources_pb2 as ledger_res
from tally.receipt.v1 import receipt_service_pb2 as receipt_api
from tally_gateway.routes import MethodNotAllowed, Route, build_routing, discover_service_files
from tally_gateway.transcoding import (
    HTTP_STATUS_BY_CODE,
    PayloadTooLarge,
    RequestTranscoder,
    UnsupportedMediaType,
    encode_response,
    encode_status,
    status_of_error,
    status_of_rpc_error,
)
from tally_kit.errors import InvalidArgument, NotFound

ROUTES = build_routing(
    discover_service_files(),
    frozenset({access_pb2.ROLE_APP, access_pb2.ROLE_ADMIN, access_pb2.ROLE_PLATFORM}),
).routes


def route(rpc: str, *, alias: bool = False) -> Route:
    return next(r for r in ROUTES if r.rpc.name == rpc and bool(r.constants) == alias)


def build(
    rpc: str,
    *,
    path: dict[str, str] | None = None,
    query: list[tuple[str, str]] | None = None,
    body: Any = None,
    raw: bytes | None = None,
    content_type: str | None = "application/json",
    headers: list[tuple[bytes, bytes]] | None = None,
    key: str | None = None,
    alias: bool = False,
) -> Any:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    return RequestTranscoder(route(rpc, alias=alias)).build(
        path_bindings=path or {},
        query=query or [],
        body=data,
        content_type=content_type,
        headers=headers or [],
        idempotency_key=key,
    )


def violations(rpc: str, **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as refused:
        build(rpc, **kwargs)
    return [(v.field, v.description) for v in refused.value.violations]


def test_path_and_query_bind_fields_in_either_spelling() -> None:
    request = build(
        "ListProducts",
        path={"merchant_id": "acme"},
        query=[
            ("pageSize", "5"),
            ("show_archived", "true"),
            ("distribution", "PRODUCT_DISTRIBUTION_GRANT"),
            ("grantPolicy", "1"),
        ],
    )
    assert request == catalog_api.ListProductsRequest(
        merchant_id="acme",
        page_size=5,
        show_archived=True,
        distribution=catalog_res.PRODUCT_DISTRIBUTION_GRANT,
        grant_policy=catalog_res.GRANT_POLICY_APPLY_ON_SIGNUP,
    )


def test_query_parameters_take_well_known_types_and_repeat_for_repeated_fields() -> None:
    history = build(
        "GetLedgerHistory",
        path={"merchant_id": "acme", "user_id": "u-1"},
        query=[("kinds", "ENTRY_KIND_DEBIT"), ("kinds", "5"), ("startTime", "2025-01-02T03:04:05Z")],
    )
    assert list(history.kinds) == [ledger_res.ENTRY_KIND_DEBIT, 5]
    assert history.start_time == Timestamp(seconds=1735787045)
    update = build(
        "UpdateMerchantConfig",
        path={"merchant_id": "acme"},
        query=[("updateMask", "taxRegime,address")],
        body={"legalName": "Acme"},
        key="k-1",
    )
    assert update.update_mask == FieldMask(paths=["tax_regime", "address"])
    assert update.config.legal_name == "Acme" and update.request_id == "k-1"


def test_query_parameters_that_cannot_bind_are_all_named() -> None:
    assert sorted(
        field
        for field, _ in violations(
            "ListProducts",
            path={"merchant_id": "acme"},
            query=[
                ("colour", "red"),
                ("merchantId", "b"),
                ("pageSize", "x"),
                ("showArchived", "yes"),
                ("currency", "a"),
                ("pageToken", "1"),
                ("pageToken", "2"),
            ],
        )
    ) == ["colour", "currency", "merchantId", "pageSize", "pageToken", "showArchived"]


def test_body_star_fills_the_request_and_the_path_wins_only_when_they_agree() -> None:
    settle = build(
        "SettlePurchase",
        path={"merchant_id": "acme", "order_id": "o-1"},
        body={
            "userId": "u-1",
            "productId": "p-1",
            "amount_paid": {"amountMinor": "990", "currency": "EUR"},
            "merchantId": "acme",
        },
        key="k-1",
    )
    assert (settle.merchant_id, settle.order_id, settle.user_id, settle.request_id) == (
        "acme",
        "o-1",
        "u-1",
        "k-1",
    )
    assert settle.amount_paid.amount_minor == 990
    assert violations(
        "SettlePurchase", path={"merchant_id": "acme", "order_id": "o-1"}, body={"orderId": "o-2"}
    ) == [("order_id", "differs between the path and the body")]
    # `body: "*"` leaves nothing to the query string.
    assert violations(
        "SettlePurchase", path={"merchant_id": "a", "order_id": "o"}, query=[("userId", "u")]
    ) == [("userId", "is not a parameter of this operation")]


def test_body_field_takes_the_body_as_that_field() -> None:
    create = build(
        "CreateProduct",
        path={"merchant_id": "acme"},
        body={"name": "Pack", "credits": {"value": "10"}, "accessPeriodDays": 30},
        query=[("requestId", "k-1")],
    )
    assert create.product.name == "Pack" and create.product.access_period_days == 30
    assert create.request_id == "k-1"
    [(field, description)] = violations("CreateProduct", path={"merchant_id": "a"}, body={"colour": "red"})
    assert field == "product" and "colour" in description


def test_bodies_that_are_not_json_objects_are_refused() -> None:
    assert violations("RegisterUser", path={"merchant_id": "a", "user_id": "u"}, raw=b"{nope")[0][0] == "body"
    assert violations("RegisterUser", path={"merchant_id": "a", "user_id": "u"}, body=[1, 2]) == [
        ("body", "must be a JSON object")
    ]
    assert violations("GetBalance", path={"merchant_id": "a", "user_id": "u"}, body={"x": 1}) == [
        ("body", "this operation takes no body")
    ]
    with pytest.raises(UnsupportedMediaType):
        build(
            "RegisterUser", path={"merchant_id": "a", "user_id": "u"}, raw=b"a=b", content_type="text/plain"
        )
    # No body at all is an empty request, whatever its content type.
    assert build("RegisterUser", path={"merchant_id": "a", "user_id": "u"}, content_type=None).user_id == "u"


def test_the_idempotency_key_fills_request_id_and_never_contradicts_it() -> None:
    register = build(
        "RegisterUser", path={"merchant_id": "a", "user_id": "u"}, body={"requestId": "k"}, key="k"
    )
    assert register.request_id == "k"
    assert violations(
        "RegisterUser", path={"merchant_id": "a", "user_id": "u"}, body={"requestId": "k"}, key="j"
    ) == [("request_id", "differs from the Idempotency-Key header")]
    # An RPC without request_id (a read) ignores the header.
    assert build(
        "GetBalance", path={"merchant_id": "a", "user_id": "u"}, key="k"
    ) == ledger_api.GetBalanceRequest(merchant_id="a", user_id="u")


def test_a_raw_body_rpc_gets_the_bytes_and_headers_without_credentials() -> None:
    body = b'{"notificationId":"n-1","eventType":"net.authorize.payment.refund.created"}'
    webhook = build(
        "HandleProviderWebhook",
        alias=True,
        path={"merchant_id": "acme"},
        raw=body,
        content_type="application/json; charset=utf-8",
        headers=[
            (b"X-ANET-Signature", b"sha512=ABC"),
            (b"authorization", b"Bearer secret"),
            (b"cookie", b"c=1"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"x-forwarded-for", b"10.0.0.2"),
        ],
    )
    assert (webhook.merchant_id, webhook.provider) == ("acme", "authorize_net")
    assert webhook.body.data == body and webhook.body.content_type == "application/json; charset=utf-8"
    assert dict(webhook.headers) == {
        "x-anet-signature": "sha512=ABC",
        "x-forwarded-for": "10.0.0.1, 10.0.0.2",
    }


def test_responses_print_defaults_int64_as_text_and_enums_by_name() -> None:
    response = catalog_api.GetProductResponse(
        product=catalog_res.Product(product_id="p-1", distribution=catalog_res.PRODUCT_DISTRIBUTION_SELLABLE)
    )
    body, media_type = encode_response(route("GetProduct"), response)
    document = json.loads(body)
    assert media_type == "application/json"
    assert document["product"]["distribution"] == "PRODUCT_DISTRIBUTION_SELLABLE"
    assert document["product"]["name"] == "" and document["product"]["state"] == "PRODUCT_STATE_UNSPECIFIED"
    assert "accessPeriodDays" not in document["product"]  # proto3 optional: only when set
    assert document == json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
    merchant = catalog_api.GetMerchantResponse(merchant=catalog_res.Merchant(config_revision=7))
    assert json.loads(encode_response(route("GetMerchant"), merchant)[0])["merchant"]["configRevision"] == "7"
    pdf = receipt_api.RenderReceiptPdfResponse(pdf=b"%PDF-1.7", file_name="r.pdf")
    assert json.loads(encode_response(route("RenderReceiptPdf"), pdf)[0]) == {
        "pdf": "JVBERi0xLjc=",
        "fileName": "r.pdf",
    }


# --- statuses ---------------------------------------------------------------------------------


def test_every_grpc_code_has_its_http_status() -> None:
    assert set(HTTP_STATUS_BY_CODE) == set(grpc.StatusCode)
    assert {code.name: status for code, status in HTTP_STATUS_BY_CODE.items()} == {
        "OK": 200,
        "CANCELLED": 499,
        "UNKNOWN": 500,
        "INVALID_ARGUMENT": 400,
        "DEADLINE_EXCEEDED": 504,
        "NOT_FOUND": 404,
        "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403,
        "RESOURCE_EXHAUSTED": 429,
        "FAILED_PRECONDITION": 409,
        "ABORTED": 409,
        "OUT_OF_RANGE": 400,
        "UNIMPLEMENTED": 501,
        "INTERNAL": 500,
        "UNAVAILABLE": 503,
        "DATA_LOSS": 500,
        "UNAUTHENTICATED": 401,
    }


def _info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    [detail] = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    return info


@pytest.mark.parametrize(
    ("error", "http_status", "code", "reason"),
    [
        (NotFound("no route", reason="ROUTE_NOT_FOUND"), 404, 5, "ROUTE_NOT_FOUND"),
        (MethodNotAllowed("DELETE", ["GET"]), 405, 12, "METHOD_NOT_ALLOWED"),
        (PayloadTooLarge(10), 413, 3, "REQUEST_TOO_LARGE"),
        (UnsupportedMediaType("text/plain"), 415, 3, "UNSUPPORTED_MEDIA_TYPE"),
    ],
)
def test_the_gateways_own_refusals(error: Exception, http_status: int, code: int, reason: str) -> None:
    status, body = status_of_error(error)  # type: ignore[arg-type]
    assert (status, body.code) == (http_status, code)
    assert (_info(body).reason, _info(body).domain) == (reason, "gateway.tally")
    document = json.loads(encode_status(body))
    assert set(document) == {"code", "message", "details"}
    assert document["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"


def _rpc_error(
    code: grpc.StatusCode, details: str, status: status_pb2.Status | None = None
) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if status is not None:
        for key, value in rpc_status.to_status(status).trailing_metadata:
            trailing.add(key, value)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


def test_an_upstream_status_passes_on_with_its_details() -> None:
    status = status_pb2.Status(code=5, message="product p-1 not found")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="PRODUCT_NOT_FOUND", domain="catalog.tally"))
    http_status, passed_on = status_of_rpc_error(
        _rpc_error(grpc.StatusCode.NOT_FOUND, "product p-1 not found", status),
        "tally.catalog.v1.CatalogService",
    )
    assert http_status == 404 and passed_on == status


def test_a_failure_on_the_way_is_told_without_the_transports_text() -> None:
    transport_text = "failed to connect to all addresses; last error: ipv4:10.1.2.3:50052: Connection refused"
    for code, http_status, message in [
        (grpc.StatusCode.UNAVAILABLE, 503, "the ledger service is unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "the ledger service did not answer in time"),
        (grpc.StatusCode.INTERNAL, 500, "the call to the ledger service failed"),
    ]:
        status, body = status_of_rpc_error(_rpc_error(code, transport_text), "tally.ledger.v1.LedgerService")
        assert (status, body.code, body.message) == (http_status, code.value[0], message)
        info = _info(body)
        assert (info.reason, info.domain, dict(info.metadata)) == (
            f"UPSTREAM_{code.name}",
            "gateway.tally",
            {"service": "tally.ledger.v1.LedgerService"},
        )
        assert "10.1.2.3" not in encode_status(body).decode()


def test_a_detail_of_an_unknown_type_is_left_out() -> None:
    status = status_pb2.Status(code=3, message="bad")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="R", domain="d"))
    status.details.add(type_url="type.googleapis.com/unknown.Type", value=b"\x01")
    assert [d["@type"] for d in json.loads(encode_status(status))["details"]] == [
        "type.googleapis.com/google.rpc.ErrorInfo"
    ]
