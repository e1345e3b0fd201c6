"""The main flows end to end through HTTP: a merchant set up by its operator and its admin,
then a user's sign-up, purchase and consumption by the merchant's app, against the real
catalog and ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from gateway_e2e import (
    Gateway,
    Upstreams,
    captured_logs,
    create_merchant,
    gateway_settings,
    new_id,
    refusal_of,
    running_gateway,
    token,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def gateway(upstreams: Upstreams) -> AsyncIterator[Gateway]:
    async with running_gateway(gateway_settings(upstreams)) as running:
        yield running


async def test_a_merchant_sells_credits_and_a_user_consumes_them(gateway: Gateway) -> None:
    merchant_id = await create_merchant(gateway, "flow")
    admin = token(gateway.settings, "admin", merchant_id)
    app = token(gateway.settings, "app", merchant_id)
    base = f"/v1/merchants/{merchant_id}"

    async def call(method: str, path: str, who: str, body: object = None, **kwargs: object) -> dict:
        headers = {"Idempotency-Key": new_id()} if method != "GET" else {}
        answer = await gateway.request(
            method, base + path, token=who, json_body=body, headers=headers, **kwargs
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        return answer.json()

    merchant = await call("GET", "", app)
    assert merchant["merchant"]["config"]["operationTimeout"] == "900s"
    assert merchant["merchant"]["configRevision"] == "1"  # int64: a string in proto3 JSON

    # body: "product" — the body is the Product itself; request_id from Idempotency-Key.
    pack = await call(
        "POST",
        "/products",
        admin,
        {
            "name": "Starter pack",
            "credits": {"value": "100"},
            "distribution": "PRODUCT_DISTRIBUTION_SELLABLE",
            "accessPeriodDays": 30,
        },
    )
    product_id = pack["product"]["productId"]
    assert pack["product"]["state"] == "PRODUCT_STATE_ACTIVE"
    welcome = await call(
        "POST",
        "/products",
        admin,
        {
            "name": "Welcome",
            "credits": {"value": "10"},
            "distribution": "PRODUCT_DISTRIBUTION_GRANT",
            "grantPolicy": "GRANT_POLICY_APPLY_ON_SIGNUP",
        },
    )
    await call(
        "POST", f"/products/{product_id}/prices", admin, {"price": {"amountMinor": "990", "currency": "EUR"}}
    )
    await call(
        "POST",
        "/operationTypes/llm.tokens/versions",
        admin,
        {"resourceUnit": "token", "creditsPerUnit": {"value": "0.002"}},
    )

    offers = await call("GET", "/offers", app, params={"currency": "EUR"})
    assert [offer["product"]["productId"] for offer in offers["offers"]] == [product_id]
    assert offers["offers"][0]["price"]["amount"] == {"amountMinor": "990", "currency": "EUR"}
    # Query parameters in JSON or proto spelling, enums by name, booleans as text.
    grants = await call(
        "GET",
        "/products",
        app,
        params={"distribution": "PRODUCT_DISTRIBUTION_GRANT", "show_archived": "true", "pageSize": "5"},
    )
    assert [p["productId"] for p in grants["products"]] == [welcome["product"]["productId"]]
    assert grants["nextPageToken"] == ""  # defaults are written out

    registered = await call("POST", "/users/user-1:register", app, {})
    assert registered["account"]["balance"]["value"] == "10"
    settled = await call(
        "POST",
        "/orders/order-1:settle",
        app,
        {
            "userId": "user-1",
            "productId": product_id,
            "amountPaid": {"amountMinor": "990", "currency": "EUR"},
            "providerReference": "psp-1",
        },
    )
    assert settled["lot"]["credits"]["value"] == "100" and "expireTime" in settled["lot"]
    opened = await call("POST", "/users/user-1/operations", app, {"operationCode": "llm.tokens"})
    operation_id = opened["operation"]["operationId"]
    closed = await call(
        "POST", f"/operations/{operation_id}:recordAndClose", app, {"resourceAmount": "12500"}
    )
    assert [(e["amount"]["value"], e["lotId"]) for e in closed["entries"]] == [
        ("-25", settled["lot"]["lotId"])
    ]

    balance = await call("GET", "/users/user-1/balance", app)
    history = await call("GET", "/users/user-1/ledger", app)
    assert balance["balance"]["balance"]["value"] == "85"
    assert Decimal(balance["balance"]["balance"]["value"]) == sum(
        Decimal(entry["amount"]["value"]) for entry in history["entries"]
    )


async def test_idempotency_key_repeats_the_first_answer_and_refuses_another_payload(gateway: Gateway) -> None:
    merchant_id = await create_merchant(gateway, "idem")
    admin = token(gateway.settings, "admin", merchant_id)
    key = new_id()
    product = {"name": "Pack", "credits": {"value": "5"}, "distribution": "PRODUCT_DISTRIBUTION_SELLABLE"}
    path = f"/v1/merchants/{merchant_id}/products"

    first = await gateway.request(
        "POST", path, token=admin, json_body=product, headers={"Idempotency-Key": key}
    )
    again = await gateway.request(
        "POST", path, token=admin, json_body=product, headers={"Idempotency-Key": key}
    )
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()

    changed = await gateway.request(
        "POST", path, token=admin, json_body={**product, "name": "Other"}, headers={"Idempotency-Key": key}
    )
    refusal = refusal_of(changed)
    assert (refusal.http_status, refusal.code, refusal.domain) == (409, 6, "catalog.tally")

    # A body (or query) request_id that contradicts the header is refused, not silently replaced.
    contradicting = await gateway.request(
        "POST", f"{path}?requestId=other", token=admin, json_body=product, headers={"Idempotency-Key": key}
    )
    assert refusal_of(contradicting).fields == ("request_id",)


async def test_upstream_refusals_keep_their_status_and_details(gateway: Gateway) -> None:
    merchant_id = await create_merchant(gateway, "refuse")
    admin = token(gateway.settings, "admin", merchant_id)
    base = f"/v1/merchants/{merchant_id}"

    missing = refusal_of(await gateway.request("GET", f"{base}/products/{new_id()}", token=admin))
    assert (missing.http_status, missing.code, missing.reason, missing.domain) == (
        404,
        5,
        "PRODUCT_NOT_FOUND",
        "catalog.tally",
    )

    created = await gateway.request(
        "POST",
        f"{base}/products",
        token=admin,
        json_body={"name": "Old", "credits": {"value": "1"}, "distribution": "PRODUCT_DISTRIBUTION_SELLABLE"},
        headers={"Idempotency-Key": new_id()},
    )
    archive = f"{base}/products/{created.json()['product']['productId']}:archive"
    first = await gateway.request("POST", archive, token=admin, headers={"Idempotency-Key": new_id()})
    assert first.status_code == 200 and first.json()["product"]["state"] == "PRODUCT_STATE_ARCHIVED"
    twice = refusal_of(
        await gateway.request("POST", archive, token=admin, headers={"Idempotency-Key": new_id()})
    )
    assert (twice.http_status, twice.code, twice.reason) == (409, 9, "PRODUCT_ARCHIVED")

    bad = refusal_of(
        await gateway.request(
            "POST",
            f"{base}/products",
            token=admin,
            json_body={"name": "", "credits": {"value": "-1"}},
            headers={"Idempotency-Key": new_id()},
        )
    )
    assert bad.http_status == 400 and bad.code == 3 and bad.domain == "catalog.tally"
    assert "product.name" in bad.fields and any(f.startswith("product.credits") for f in bad.fields)


async def test_the_gateway_refuses_what_it_cannot_transcode(gateway: Gateway) -> None:
    merchant_id = await create_merchant(gateway, "shape")
    admin = token(gateway.settings, "admin", merchant_id)
    base = f"/v1/merchants/{merchant_id}"
    cases = {
        "unknown query parameter": ("GET", f"{base}/products?colour=red", None, "colour"),
        "query parameter bound by the path": ("GET", f"{base}/products?merchantId=other", None, "merchantId"),
        "bad integer": ("GET", f"{base}/products?pageSize=many", None, "pageSize"),
        "bad boolean": ("GET", f"{base}/products?showArchived=yes", None, "showArchived"),
        "scalar given twice": ("GET", f"{base}/products?pageSize=1&pageSize=2", None, "pageSize"),
        "unknown body field": ("POST", f"{base}/products", {"colour": "red"}, "product"),
        "body on a read": ("GET", f"{base}/products", {"x": 1}, "body"),
        "body merchant differs from the path": (
            "POST",
            f"{base}/users/u-1:register",
            {"merchantId": "someone-else"},
            "merchant_id",
        ),
    }
    for label, (method, path, body, field) in cases.items():
        answer = await gateway.request(
            method, path, token=admin, json_body=body, headers={"Idempotency-Key": new_id()}
        )
        refusal = refusal_of(answer)
        assert (refusal.http_status, refusal.domain, refusal.fields) == (400, "gateway.tally", (field,)), (
            label
        )

    not_json = await gateway.request(
        "POST",
        f"{base}/users/u-1:register",
        token=admin,
        content=b"{oops",
        headers={"content-type": "application/json", "Idempotency-Key": new_id()},
    )
    assert refusal_of(not_json).fields == ("body",)
    wrong_type = await gateway.request(
        "POST",
        f"{base}/users/u-1:register",
        token=admin,
        content=b"a=b",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert (refusal_of(wrong_type).http_status, refusal_of(wrong_type).reason) == (
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    nowhere = refusal_of(await gateway.request("GET", "/v1/nowhere", token=admin))
    assert (nowhere.http_status, nowhere.reason) == (404, "ROUTE_NOT_FOUND")
    wrong_method = await gateway.request("DELETE", f"{base}/products", token=admin)
    assert (refusal_of(wrong_method).http_status, wrong_method.headers["allow"]) == (405, "GET, POST")


async def test_request_id_and_idempotency_key_reach_the_logs_and_the_service(gateway: Gateway) -> None:
    merchant_id = await create_merchant(gateway, "trace")
    admin = token(gateway.settings, "admin", merchant_id)
    key = new_id()
    async with captured_logs() as logs:
        answer = await gateway.request(
            "POST",
            f"/v1/merchants/{merchant_id}/products",
            token=admin,
            json_body={
                "name": "Traced",
                "credits": {"value": "1"},
                "distribution": "PRODUCT_DISTRIBUTION_SELLABLE",
            },
            headers={"Idempotency-Key": key, "X-Request-Id": "trace-42"},
        )
        generated = await gateway.request("GET", f"/v1/merchants/{merchant_id}", token=admin)
        replaced = await gateway.request(
            "GET", f"/v1/merchants/{merchant_id}", token=admin, headers={"X-Request-Id": "bad id with spaces"}
        )
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-42"
    [gateway_line] = [
        line for line in logs.of_logger("tally_gateway.access") if line.get("idempotency_key") == key
    ]
    assert gateway_line["correlation_id"] == "trace-42" and gateway_line["merchant_id"] == merchant_id
    assert gateway_line["route"] == "/v1/merchants/{merchant_id}/products" and gateway_line["status"] == 200
    [service_line] = [
        line
        for line in logs.of_logger("tally_kit.access")
        if line["grpc_method"] == "/tally.catalog.v1.CatalogService/CreateProduct"
    ]
    assert service_line["correlation_id"] == "trace-42" and service_line["grpc_code"] == "OK"

    for other in (generated, replaced):
        request_id = other.headers["x-request-id"]
        assert len(request_id) == 36 and request_id != "bad id with spaces"
        assert any(line.get("correlation_id") == request_id for line in logs.of_logger("tally_kit.access"))
