"""The status table through HTTP: a real kit server (its interceptor turning errors into
statuses with `google.rpc` details) behind the gateway, failing on demand, and upstreams that
are slow, down or refuse the forwarded token."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
from gateway_e2e import (
    BAD_REQUEST,
    KIT,
    SECRET_IN_EXCEPTION,
    Gateway,
    Upstreams,
    gateway_settings,
    refusal_of,
    running_gateway,
    token,
)
from pydantic import SecretStr
from tally.kittest.v1 import kittest_pb2

pytestmark = pytest.mark.integration

ECHO = "/v1/merchants/acme/kittest:echo"
KIT_FILES = [kittest_pb2.DESCRIPTOR]

# failure → (HTTP status, gRPC code, reason)
EXPECTED = {
    "FAILURE_INVALID_ARGUMENT": (400, 3, "INVALID_ARGUMENT"),
    "FAILURE_NOT_FOUND": (404, 5, "KIT_NOT_FOUND"),
    "FAILURE_ALREADY_EXISTS": (409, 6, "KIT_ALREADY_EXISTS"),
    "FAILURE_FAILED_PRECONDITION": (409, 9, "KIT_FAILED_PRECONDITION"),
    "FAILURE_PERMISSION_DENIED": (403, 7, "KIT_PERMISSION_DENIED"),
    "FAILURE_UNAUTHENTICATED": (401, 16, "KIT_UNAUTHENTICATED"),
    "FAILURE_RESOURCE_EXHAUSTED": (429, 8, "KIT_RESOURCE_EXHAUSTED"),
    "FAILURE_UNAVAILABLE": (503, 14, "KIT_UNAVAILABLE"),
}


@pytest.fixture(scope="module")
async def gateway(upstreams: Upstreams) -> AsyncIterator[Gateway]:
    async with running_gateway(
        gateway_settings(upstreams, readiness_services=[]), service_files=KIT_FILES
    ) as gw:
        yield gw


def app_token(gateway: Gateway) -> str:
    return token(gateway.settings, "app", "acme")


@pytest.mark.parametrize("failure", sorted(EXPECTED))
async def test_each_upstream_error_keeps_its_code_and_details(gateway: Gateway, failure: str) -> None:
    answer = await gateway.request("POST", ECHO, token=app_token(gateway), json_body={"failWith": failure})
    refusal = refusal_of(answer)
    assert (refusal.http_status, refusal.code, refusal.reason) == EXPECTED[failure]
    assert refusal.domain == "kittest.tally"
    if failure == "FAILURE_INVALID_ARGUMENT":
        assert refusal.fields == ("text",)
        assert [d["@type"] for d in refusal.body["details"]][1] == BAD_REQUEST
    else:
        assert refusal.metadata == {"k": "v"} and refusal.message == "refused by the test"


async def test_an_unexpected_failure_is_500_and_tells_nothing(gateway: Gateway) -> None:
    answer = await gateway.request(
        "POST", ECHO, token=app_token(gateway), json_body={"failWith": "FAILURE_UNEXPECTED"}
    )
    refusal = refusal_of(answer)
    assert (refusal.http_status, refusal.code, refusal.reason) == (500, 13, "UPSTREAM_INTERNAL")
    assert SECRET_IN_EXCEPTION not in answer.text


async def test_a_success_carries_the_request_id_and_merchant_to_the_service(gateway: Gateway) -> None:
    answer = await gateway.request(
        "POST", ECHO, token=app_token(gateway), json_body={"text": "hi"}, headers={"X-Request-Id": "req-7"}
    )
    assert answer.status_code == 200
    assert answer.json() == {"text": "hi", "correlationId": "req-7", "merchantId": "acme"}
    assert answer.headers["x-request-id"] == "req-7"


async def test_public_rpcs_need_no_token_and_unrouted_ones_are_not_there(gateway: Gateway) -> None:
    assert (await gateway.request("GET", "/v1/kittest:ping")).json() == {}
    for path in ("/v1/kittest:unguarded", "/v1/merchants/acme/kittest:streamEcho"):
        refusal = refusal_of(await gateway.request("GET", path, token=app_token(gateway)))
        assert (refusal.http_status, refusal.reason) == (404, "ROUTE_NOT_FOUND")


async def test_a_slow_upstream_is_504(upstreams: Upstreams) -> None:
    settings = gateway_settings(upstreams, readiness_services=[], upstream_timeout_seconds=0.2)
    async with running_gateway(settings, service_files=KIT_FILES) as gateway:
        answer = await gateway.request("POST", ECHO, token=app_token(gateway), json_body={"delayMs": 2000})
    refusal = refusal_of(answer)
    assert (refusal.http_status, refusal.code, refusal.reason) == (504, 4, "UPSTREAM_DEADLINE_EXCEEDED")
    assert refusal.message == "the kittest service did not answer in time"


async def test_an_upstream_that_is_down_is_503_then_fails_fast(upstreams: Upstreams) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    targets = {**upstreams.targets(), KIT: f"127.0.0.1:{closed_port}"}
    settings = gateway_settings(upstreams, upstreams=targets, readiness_services=[])
    async with running_gateway(settings, service_files=KIT_FILES) as gateway:
        reasons = []
        for _ in range(7):
            answer = await gateway.request("POST", ECHO, token=app_token(gateway), json_body={})
            refusal = refusal_of(answer)
            assert (refusal.http_status, refusal.code) == (503, 14)
            assert str(closed_port) not in answer.text
            reasons.append(refusal.reason)
    # After consecutive outages the circuit opens and calls fail without trying.
    assert reasons[0] == "UPSTREAM_UNAVAILABLE" and reasons[-1] == "CIRCUIT_OPEN"


async def test_the_service_checks_the_forwarded_token_again(upstreams: Upstreams) -> None:
    # A gateway that trusts another signing key than the service: the token it accepts is
    # forwarded as it is, and the service refuses it on its own.
    other_key = SecretStr("a-gateway-with-another-key-" + "k" * 24)
    settings = gateway_settings(upstreams, readiness_services=[], jwt_secret=other_key)
    async with running_gateway(settings, service_files=KIT_FILES) as gateway:
        answer = await gateway.request("POST", ECHO, token=app_token(gateway), json_body={"text": "x"})
    refusal = refusal_of(answer)
    assert (refusal.http_status, refusal.domain, refusal.reason) == (401, "kittest.tally", "TOKEN_INVALID")
