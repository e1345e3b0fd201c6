"""What the edge does around every call: rate limits, the size limit, CORS, the provider
webhook, health, readiness, metrics, the OpenAPI document and the docs page."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from gateway_e2e import (
    CATALOG,
    KIT,
    LEDGER,
    PAYMENTS,
    RECEIPTS,
    RETRY_INFO,
    Gateway,
    Upstreams,
    gateway_settings,
    new_id,
    refusal_of,
    running_gateway,
    token,
)
from tally.kittest.v1 import kittest_pb2

pytestmark = pytest.mark.integration

ECHO = "/v1/merchants/acme/kittest:echo"
PING = "/v1/kittest:ping"
KIT_FILES = [kittest_pb2.DESCRIPTOR]


@pytest.fixture(scope="module")
async def gateway(upstreams: Upstreams) -> AsyncIterator[Gateway]:
    async with running_gateway(gateway_settings(upstreams)) as running:
        yield running


def client_from(gateway: Gateway, address: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway.app, client=(address, 40001)), base_url="http://gateway"
    )


async def test_each_client_address_has_its_own_rate_limit(upstreams: Upstreams) -> None:
    settings = gateway_settings(
        upstreams, readiness_services=[], rate_limit_address_per_second=0.5, rate_limit_address_burst=3
    )
    async with running_gateway(settings, service_files=KIT_FILES, client_address="192.0.2.1") as gateway:
        answers = [await gateway.request("GET", PING) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        limited = refusal_of(answers[-1])
        assert (limited.code, limited.reason, limited.metadata) == (8, "RATE_LIMITED", {"limit": "address"})
        assert answers[-1].headers["retry-after"] == "2"  # one request every 2 s
        [retry] = [d for d in limited.body["details"] if d["@type"] == RETRY_INFO]
        assert 1.9 < float(retry["retryDelay"].removesuffix("s")) <= 2.0
        async with client_from(gateway, "192.0.2.2") as other:
            assert (await other.get(PING)).status_code == 200
            # Requests for no route spend the address's allowance as well.
            for _ in range(2):
                assert (await other.get("/v1/nowhere")).status_code == 404
            assert (await other.get(PING)).status_code == 429


async def test_each_token_has_its_own_rate_limit(upstreams: Upstreams) -> None:
    settings = gateway_settings(
        upstreams, readiness_services=[], rate_limit_token_per_second=1.0, rate_limit_token_burst=2
    )
    async with running_gateway(settings, service_files=KIT_FILES) as gateway:
        first = token(gateway.settings, "app", "acme")
        answers = [await gateway.request("POST", ECHO, token=first, json_body={}) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert refusal_of(answers[-1]).metadata == {"limit": "token"}
        assert answers[-1].headers["retry-after"] == "1"
        second = token(gateway.settings, "admin", "acme")
        assert (await gateway.request("POST", ECHO, token=second, json_body={})).status_code == 200


async def test_bodies_over_the_limit_are_refused_whether_announced_or_streamed(upstreams: Upstreams) -> None:
    settings = gateway_settings(upstreams, readiness_services=[], max_request_bytes=64)
    async with running_gateway(settings, service_files=KIT_FILES) as gateway:
        app = token(gateway.settings, "app", "acme")
        fits = await gateway.request("POST", ECHO, token=app, json_body={"text": "x" * 40})
        assert fits.status_code == 200
        announced = await gateway.request("POST", ECHO, token=app, json_body={"text": "x" * 100})

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"text": "'
            for _ in range(10):
                yield b"x" * 10
            yield b'"}'

        streamed = await gateway.request(
            "POST", ECHO, token=app, content=chunks(), headers={"content-type": "application/json"}
        )
    for answer in (announced, streamed):
        refusal = refusal_of(answer)
        assert (refusal.http_status, refusal.reason, refusal.fields) == (413, "REQUEST_TOO_LARGE", ("body",))


async def test_cors_is_off_unless_origins_are_configured(gateway: Gateway, upstreams: Upstreams) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    balance = "/v1/merchants/acme/users/u-1/balance"
    closed = await gateway.request("OPTIONS", balance, headers=preflight)
    assert closed.status_code == 405 and "access-control-allow-origin" not in closed.headers
    plain = await gateway.request("GET", "/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in plain.headers

    settings = gateway_settings(upstreams, cors_allowed_origins=["https://app.example"])
    async with running_gateway(settings) as open_gateway:
        allowed = await open_gateway.request("OPTIONS", balance, headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        other_origin = await open_gateway.request(
            "OPTIONS", balance, headers={**preflight, "Origin": "https://evil"}
        )
        assert other_origin.status_code == 400
        answer = await open_gateway.request(
            "GET", balance, token=token(settings, "app", "acme"), headers={"Origin": "https://app.example"}
        )
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert "X-Request-Id" in answer.headers["access-control-expose-headers"]


async def test_the_authorize_net_webhook_reaches_the_payment_gateway_byte_for_byte(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    raw = '{ "notificationId":"n-9",  "eventType":"net.authorize.payment.refund.created", "x":"é" }'.encode()
    answer = await gateway.request(
        "POST",
        "/v1/webhooks/authorize-net/acme-shop",
        content=raw,
        headers={
            "content-type": "application/json",
            "X-ANET-Signature": "sha512=" + "AB" * 64,
            "Cookie": "session=1",
            "X-Request-Id": "hook-1",
        },
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"notificationId": f"n-{len(upstreams.payments.webhooks)}", "duplicate": False}
    received = upstreams.payments.webhooks[-1]
    assert (received.merchant_id, received.provider) == ("acme-shop", "authorize_net")
    assert received.body.data == raw and received.body.content_type == "application/json"
    assert received.headers["x-anet-signature"] == "sha512=" + "AB" * 64
    assert "cookie" not in received.headers and "authorization" not in received.headers
    assert upstreams.payments.webhook_metadata[-1]["x-request-id"] == "hook-1"

    # The annotated route reaches the same RPC; a token, when one is sent, is forwarded.
    bearer = token(gateway.settings, "platform")
    annotated = await gateway.request(
        "POST",
        "/v1/merchants/acme-shop/webhooks/authorize_net",
        content=b"{}",
        token=bearer,
        headers={"content-type": "application/json"},
    )
    assert annotated.status_code == 200
    assert upstreams.payments.webhook_metadata[-1]["authorization"] == f"Bearer {bearer}"
    assert "authorization" not in upstreams.payments.webhooks[-1].headers


async def test_health_and_readiness(gateway: Gateway, upstreams: Upstreams) -> None:
    assert (await gateway.request("GET", "/healthz")).json() == {"status": "ok"}
    ready = await gateway.request("GET", "/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "upstreams": {CATALOG: "SERVING", LEDGER: "SERVING", PAYMENTS: "SERVING"},
    }
    settings = gateway_settings(upstreams, readiness_services=[CATALOG, RECEIPTS])
    async with running_gateway(settings) as partial:
        not_ready = await partial.request("GET", "/readyz")
    # The kit server standing in at the receipt service's address does not serve it.
    assert not_ready.status_code == 503
    assert not_ready.json()["upstreams"] == {CATALOG: "SERVING", RECEIPTS: "NOT_FOUND"}


async def test_metrics_count_requests_by_route_template(upstreams: Upstreams) -> None:
    async with running_gateway(
        gateway_settings(upstreams, readiness_services=[]), service_files=KIT_FILES
    ) as gw:
        await gw.request("GET", PING)
        await gw.request("POST", ECHO, token=token(gw.settings, "app", "acme"), json_body={})
        await gw.request("GET", "/v1/nowhere/" + new_id())
        await gw.request("BREW", PING)
        text = (await gw.request("GET", "/metrics")).text
    assert 'http_requests_total{code="200",method="GET",route="/v1/kittest:ping"}' in text
    assert 'route="/v1/merchants/{merchant_id}/kittest:echo"' in text
    assert 'http_requests_total{code="404",method="GET",route="unmatched"}' in text
    assert 'method="other"' in text and "BREW" not in text
    assert 'http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/kittest:ping"}' in text
    assert f'grpc_client_handled_total{{grpc_code="OK",grpc_method="Echo",grpc_service="{KIT}"' in text
    assert 'tally_build_info{service="gateway"' in text


async def test_the_openapi_document_and_the_docs_page_are_served(gateway: Gateway) -> None:
    document = await gateway.request("GET", "/openapi.json")
    assert document.headers["content-type"] == "application/json"
    assert document.json() == json.loads(json.dumps(gateway.app.state.openapi))
    docs = await gateway.request("GET", "/docs")
    assert docs.headers["content-type"].startswith("text/html")
    assert "Tally HTTP API" in docs.text and "LedgerService_GetBalance" in docs.text
