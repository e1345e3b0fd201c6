"""The authorization matrix: every route by role by own or other merchant, and tokens that must
never get through (missing, expired, forged, for another audience or issuer, `alg: none`);
production keys (RS256, ES256) from a JWKS file under an algorithm allow-list.

A refusal is the gateway's own (domain `gateway.tally`), says nothing but the refusal, and
reaches no service: the gRPC servers of this process start no call while refusals are
answered. A call the matrix allows gets past the gateway to its service, which answers as
it will (the requests carry placeholder ids, so mostly 400 or 404) but never 401 or 403.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from gateway_e2e import (
    Gateway,
    Upstreams,
    bad_tokens,
    create_merchant,
    gateway_settings,
    new_id,
    refusal_of,
    running_gateway,
    server_calls_started,
    token,
)
from tally.common.v1 import access_pb2
from tally.kittest.v1 import kittest_pb2
from tally_gateway.routes import Route

pytestmark = pytest.mark.integration

ROLES = ("app", "admin", "platform")
_PLACEHOLDERS = {
    "user_id": "matrix-user",
    "order_id": "matrix-order",
    "operation_code": "matrix.op",
    "version": "1",
    "provider": "authorize_net",
}


@dataclass(frozen=True)
class Merchants:
    own: str
    other: str


@pytest.fixture(scope="module")
async def gateway(upstreams: Upstreams) -> AsyncIterator[Gateway]:
    async with running_gateway(gateway_settings(upstreams)) as running:
        yield running


@pytest.fixture(scope="module")
async def merchants(gateway: Gateway) -> Merchants:
    own = await create_merchant(gateway, "authz-own")
    return Merchants(own, await create_merchant(gateway, "authz-other"))


def routes(gateway: Gateway) -> tuple[Route, ...]:
    return gateway.app.state.gateway.routing.routes


def url(route: Route, merchant_id: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match[1]
        if name == "merchant_id":
            return merchant_id
        return _PLACEHOLDERS.get(name, str(uuid.uuid4()))

    return re.sub(r"\{([^}=]+)\}", value, route.template.openapi_path)


def body(route: Route, merchant_id: str) -> dict[str, str] | None:
    if not route.body:
        return None
    # A route whose path names no merchant takes it from the body.
    return {} if "merchant_id" in route.path_fields else {"merchantId": merchant_id}


def role_value(role: str) -> int:
    return access_pb2.Role.Value(f"ROLE_{role.upper()}")


def allowed(route: Route, role: str, own: bool) -> bool:
    if route.is_public:
        return True
    return role_value(role) in route.roles and (own or role == "platform")


async def send(gateway: Gateway, route: Route, merchant_id: str, bearer: str | None):  # type: ignore[no-untyped-def]
    return await gateway.request(
        route.http_method,
        url(route, merchant_id),
        token=bearer,
        json_body=body(route, merchant_id),
        headers={"Idempotency-Key": new_id()},
    )


def assert_refused(answer, http_status: int, reasons: set[str], label: str) -> None:  # type: ignore[no-untyped-def]
    refusal = refusal_of(answer)
    assert (refusal.http_status, refusal.domain) == (http_status, "gateway.tally"), label
    assert refusal.reason in reasons, (label, refusal.reason)
    assert len(refusal.body["details"]) == 1, label  # the ErrorInfo, and no data


async def test_every_route_by_role_and_merchant(gateway: Gateway, merchants: Merchants) -> None:
    cases = [(route, role, own) for route in routes(gateway) for role in ROLES for own in (True, False)]
    assert len(cases) == 6 * len(routes(gateway)) > 200

    def merchant_of(own: bool) -> str:
        return merchants.own if own else merchants.other

    denied = [case for case in cases if not allowed(*case)]
    before = server_calls_started()
    for route, role, own in denied:
        answer = await send(gateway, route, merchant_of(own), token(gateway.settings, role, merchants.own))
        assert_refused(
            answer, 403, {"ROLE_NOT_ALLOWED", "MERCHANT_MISMATCH"}, f"{role} {own} {route.operation_id}"
        )
    assert server_calls_started() == before, "a refused request reached a service"

    for route, role, own in (case for case in cases if allowed(*case)):
        answer = await send(gateway, route, merchant_of(own), token(gateway.settings, role, merchants.own))
        label = f"{role} own={own} {route.operation_id}: {answer.status_code} {answer.text[:200]}"
        assert answer.status_code not in (401, 403), label
        if answer.status_code >= 400:
            # Refused by the service, or failed there: either way past the gateway.
            refusal = refusal_of(answer)
            assert refusal.domain != "gateway.tally" or refusal.reason.startswith("UPSTREAM_"), label


async def test_bad_or_missing_tokens_never_get_through(gateway: Gateway, merchants: Merchants) -> None:
    tokens = bad_tokens(gateway.settings, merchants.own)
    before = server_calls_started()
    for route in routes(gateway):
        for kind, bad in tokens.items():
            answer = await send(gateway, route, merchants.own, bad)
            assert_refused(
                answer,
                401,
                {"TOKEN_INVALID", "TOKEN_EXPIRED", "TOKEN_AUDIENCE_MISMATCH", "TOKEN_ISSUER_MISMATCH"},
                f"{kind} {route.operation_id}",
            )
            assert answer.headers["www-authenticate"] == 'Bearer realm="tally", error="invalid_token"'
        if not route.is_public:
            missing = await send(gateway, route, merchants.own, None)
            assert_refused(missing, 401, {"TOKEN_MISSING"}, route.operation_id)
            assert missing.headers["www-authenticate"] == 'Bearer realm="tally"'
    assert server_calls_started() == before, "a refused request reached a service"


async def test_each_bad_token_is_refused_for_its_own_reason(gateway: Gateway, merchants: Merchants) -> None:
    tokens = bad_tokens(gateway.settings, merchants.own)
    balance = f"/v1/merchants/{merchants.own}/users/u-1/balance"
    reasons = {}
    for kind, bad in tokens.items():
        reasons[kind] = refusal_of(await gateway.request("GET", balance, token=bad)).reason
    assert reasons == {
        "expired": "TOKEN_EXPIRED",
        "forged": "TOKEN_INVALID",
        "wrong_audience": "TOKEN_AUDIENCE_MISMATCH",
        "wrong_issuer": "TOKEN_ISSUER_MISMATCH",
        "alg_none": "TOKEN_INVALID",
        "garbage": "TOKEN_INVALID",
    }
    not_bearer = await gateway.request("GET", balance, headers={"authorization": "Basic dXNlcjpwYXNz"})
    assert refusal_of(not_bearer).reason == "TOKEN_INVALID"


async def test_service_tokens_are_refused_at_the_edge(gateway: Gateway, merchants: Merchants) -> None:
    service = token(gateway.settings, "service")
    answer = await gateway.request("GET", f"/v1/merchants/{merchants.own}/users/u-1/balance", token=service)
    assert_refused(answer, 403, {"ROLE_NOT_ALLOWED"}, "service")


async def test_production_keys_from_a_jwks_file_with_an_algorithm_allow_list(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, key, algorithm in (("rsa-1", rsa_key, "RS256"), ("ec-1", ec_key, "ES256")):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": algorithm, "use": "sig"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": keys}))
    settings = gateway_settings(
        upstreams, readiness_services=[], jwt_algorithms=["RS256", "ES256"], jwt_jwks_file=str(jwks)
    )
    claims = {
        "sub": "acme-app",
        "role": "app",
        "merchant_id": "acme",
        "aud": settings.jwt_audience,
        "iss": settings.jwt_issuer,
        "exp": int(time.time()) + 600,
    }

    def signed(key: object, algorithm: str, kid: str) -> str:
        return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})  # type: ignore[arg-type]

    async with running_gateway(settings, service_files=[kittest_pb2.DESCRIPTOR]) as gateway:
        other_merchant = "/v1/merchants/other/kittest:echo"

        async def reason(bearer: str) -> str:
            return refusal_of(
                await gateway.request("POST", other_merchant, token=bearer, json_body={})
            ).reason

        # Valid signatures: the token is accepted, then refused for naming another merchant.
        assert await reason(signed(rsa_key, "RS256", "rsa-1")) == "MERCHANT_MISMATCH"
        assert await reason(signed(ec_key, "ES256", "ec-1")) == "MERCHANT_MISMATCH"
        # HS256 is off the allow-list, even signed with the development secret.
        assert await reason(token(settings, "app", "acme")) == "TOKEN_INVALID"
        assert await reason(signed(rsa_key, "RS256", "unknown-kid")) == "TOKEN_KEY_UNKNOWN"
        assert (
            await reason(signed(rsa.generate_private_key(65537, 2048), "RS256", "rsa-1")) == "TOKEN_INVALID"
        )
