"""Token verification, the access policy read from the protos, and development tokens."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import SecretStr
from tally.common.v1 import access_pb2
from tally.kittest.v1 import kittest_pb2  # noqa: F401  (registers KitTestService in the descriptor pool)
from tally_kit import auth
from tally_kit.auth import (
    Principal,
    TokenVerifier,
    authorize,
    issue_dev_token,
    main,
    required_roles,
)
from tally_kit.errors import PermissionDenied, Unauthenticated, Unavailable
from tally_kit.settings import ServiceSettings

SETTINGS = ServiceSettings(service_name="kittest")
VERIFIER = TokenVerifier(SETTINGS)
SECRET = SETTINGS.jwt_secret.get_secret_value()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "sub": "user-1",
        "role": "app",
        "merchant_id": "acme",
        "aud": "tally",
        "iss": "tally-dev",
        "exp": now + 60,
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def hand_made(header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A token PyJWT would refuse to encode, e.g. with a malformed header."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(payload)}.c2lnbmF0dXJl"


def refusal_reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as raised:
        verifier.verify(token)
    return raised.value.reason


# HS256 (development)


def test_valid_token_gives_its_principal() -> None:
    principal = VERIFIER.verify(jwt.encode(claims(), SECRET))
    assert principal == Principal(subject="user-1", role=access_pb2.ROLE_APP, merchant_id="acme")


def test_dev_token_round_trips() -> None:
    token = issue_dev_token(SETTINGS, role="platform", merchant_id=None, subject="ops")
    assert VERIFIER.verify(token) == Principal(subject="ops", role=access_pb2.ROLE_PLATFORM, merchant_id=None)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        pytest.param("", "TOKEN_MISSING", id="missing"),
        pytest.param("not-a-jwt", "TOKEN_INVALID", id="garbage"),
        pytest.param(jwt.encode(claims(exp=int(time.time()) - 120), SECRET), "TOKEN_EXPIRED", id="expired"),
        pytest.param(
            jwt.encode(claims(), "another-secret-of-sufficient-length-0123"), "TOKEN_INVALID", id="forged"
        ),
        pytest.param(jwt.encode(claims(aud="elsewhere"), SECRET), "TOKEN_AUDIENCE_MISMATCH", id="audience"),
        pytest.param(jwt.encode(claims(iss="mallory"), SECRET), "TOKEN_ISSUER_MISMATCH", id="issuer"),
        pytest.param(jwt.encode(claims(), None, algorithm="none"), "TOKEN_INVALID", id="alg-none"),
        pytest.param(
            jwt.encode(claims(), SECRET * 2, algorithm="HS512"), "TOKEN_INVALID", id="alg-not-allowed"
        ),
        pytest.param(
            hand_made({"alg": ["HS256"], "typ": "JWT"}, claims()), "TOKEN_INVALID", id="alg-not-a-string"
        ),
        pytest.param(jwt.encode(claims(exp=None), SECRET), "TOKEN_INVALID", id="no-exp"),
        pytest.param(jwt.encode(claims(aud=None), SECRET), "TOKEN_INVALID", id="no-aud"),
        pytest.param(jwt.encode(claims(sub=None), SECRET), "TOKEN_INVALID", id="no-sub"),
        pytest.param(jwt.encode(claims(role="root"), SECRET), "TOKEN_ROLE_INVALID", id="unknown-role"),
        pytest.param(
            jwt.encode(claims(merchant_id=None), SECRET), "TOKEN_MERCHANT_MISSING", id="app-no-merchant"
        ),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(token: str, reason: str) -> None:
    assert refusal_reason(VERIFIER, token) == reason


def test_clock_skew_within_leeway_is_tolerated() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - SETTINGS.jwt_leeway_seconds // 2), SECRET)
    assert VERIFIER.verify(token).subject == "user-1"


@pytest.mark.parametrize("algorithms", [["none"], ["HS256", "none"], [], ["XX999"]])
def test_unsafe_or_unknown_algorithm_lists_are_rejected(algorithms: list[str]) -> None:
    with pytest.raises(ValueError):
        TokenVerifier(ServiceSettings(jwt_algorithms=algorithms))


def test_asymmetric_algorithms_need_a_key_source() -> None:
    with pytest.raises(ValueError):
        TokenVerifier(ServiceSettings(jwt_algorithms=["RS256"]))


# RS256 and ES256 keys by kid


def rsa_key(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, alg="RS256", use="sig")
    return key, jwk


@pytest.fixture(scope="module")
def two_rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, rsa.RSAPrivateKey], Path]:
    (key_a, jwk_a), (key_b, jwk_b) = rsa_key("key-a"), rsa_key("key-b")
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_a, jwk_b]}))
    return {"key-a": key_a, "key-b": key_b}, path


def test_rs256_keys_from_a_jwks_file_are_selected_by_kid(two_rsa_keys) -> None:
    keys, path = two_rsa_keys
    verifier = TokenVerifier(ServiceSettings(jwt_algorithms=["RS256"], jwt_jwks_file=str(path)))
    for kid, key in keys.items():
        token = jwt.encode(claims(sub=kid), key, algorithm="RS256", headers={"kid": kid})
        assert verifier.verify(token).subject == kid
    signed_by_a_claiming_b = jwt.encode(claims(), keys["key-a"], algorithm="RS256", headers={"kid": "key-b"})
    assert refusal_reason(verifier, signed_by_a_claiming_b) == "TOKEN_INVALID"
    unknown_kid = jwt.encode(claims(), keys["key-a"], algorithm="RS256", headers={"kid": "key-z"})
    assert refusal_reason(verifier, unknown_kid) == "TOKEN_KEY_UNKNOWN"
    no_kid = jwt.encode(claims(), keys["key-a"], algorithm="RS256")
    assert refusal_reason(verifier, no_kid) == "TOKEN_KEY_UNKNOWN"


def test_hs256_token_is_refused_when_only_rs256_is_allowed(two_rsa_keys) -> None:
    _, path = two_rsa_keys
    verifier = TokenVerifier(ServiceSettings(jwt_algorithms=["RS256"], jwt_jwks_file=str(path)))
    assert refusal_reason(verifier, jwt.encode(claims(), SECRET, headers={"kid": "key-a"})) == "TOKEN_INVALID"


@pytest.fixture
def es256_jwks_url() -> Iterator[tuple[ec.EllipticCurvePrivateKey, str]]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid="ec-1", alg="ES256", use="sig")
    body = json.dumps({"keys": [jwk]}).encode()

    class JwksHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), JwksHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield key, f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json"
    server.shutdown()
    server.server_close()
    thread.join()


async def test_es256_keys_are_fetched_from_a_jwks_url(es256_jwks_url) -> None:
    key, url = es256_jwks_url
    verifier = TokenVerifier(ServiceSettings(jwt_algorithms=["ES256"], jwt_jwks_url=url))
    token = jwt.encode(
        claims(role="service", merchant_id=None), key, algorithm="ES256", headers={"kid": "ec-1"}
    )
    principal = await verifier.verify_async(token)
    assert principal == Principal(subject="user-1", role=access_pb2.ROLE_SERVICE, merchant_id=None)
    unknown = jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "ec-9"})
    with pytest.raises(Unauthenticated) as raised:
        await verifier.verify_async(unknown)
    assert raised.value.reason == "TOKEN_KEY_UNKNOWN"


async def test_unreachable_jwks_url_is_unavailable_not_unauthenticated() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    verifier = TokenVerifier(
        ServiceSettings(jwt_algorithms=["ES256"], jwt_jwks_url=f"http://127.0.0.1:{closed_port}/jwks.json")
    )
    token = jwt.encode(
        claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "k"}
    )
    with pytest.raises(Unavailable) as raised:
        await verifier.verify_async(token)
    assert raised.value.reason == "JWKS_UNAVAILABLE"


# The access policy


def test_required_roles_come_from_the_access_option() -> None:
    everyone = {access_pb2.ROLE_APP, access_pb2.ROLE_ADMIN, access_pb2.ROLE_PLATFORM, access_pb2.ROLE_SERVICE}
    assert required_roles("/tally.kittest.v1.KitTestService/Echo") == everyone
    assert required_roles("/tally.kittest.v1.KitTestService/AdminEcho") == {
        access_pb2.ROLE_ADMIN,
        access_pb2.ROLE_PLATFORM,
    }
    assert required_roles("/tally.kittest.v1.KitTestService/Ping") == frozenset()
    assert required_roles("/tally.kittest.v1.KitTestService/Unguarded") is None
    assert required_roles("/tally.kittest.v1.KitTestService/Nope") is None
    assert required_roles("/tally.nope.v1.NopeService/Echo") is None


EVERYONE = frozenset(
    {access_pb2.ROLE_APP, access_pb2.ROLE_ADMIN, access_pb2.ROLE_PLATFORM, access_pb2.ROLE_SERVICE}
)


@pytest.mark.parametrize(
    ("role", "token_merchant", "request_merchant", "reason"),
    [
        (access_pb2.ROLE_APP, "acme", "acme", None),
        (access_pb2.ROLE_ADMIN, "acme", "acme", None),
        (access_pb2.ROLE_APP, "acme", "globex", "MERCHANT_MISMATCH"),
        (access_pb2.ROLE_ADMIN, "acme", "", "MERCHANT_MISMATCH"),
        (access_pb2.ROLE_APP, "acme", None, None),
        (access_pb2.ROLE_PLATFORM, None, "globex", None),
        (access_pb2.ROLE_SERVICE, None, "acme", None),
    ],
)
def test_merchant_rule(
    role: int, token_merchant: str | None, request_merchant: str | None, reason: str | None
) -> None:
    principal = Principal(subject="s", role=role, merchant_id=token_merchant)
    if reason is None:
        authorize(principal, EVERYONE, request_merchant)
        return
    with pytest.raises(PermissionDenied) as raised:
        authorize(principal, EVERYONE, request_merchant)
    assert raised.value.reason == reason


def test_role_outside_the_policy_is_denied() -> None:
    principal = Principal(subject="s", role=access_pb2.ROLE_PLATFORM, merchant_id=None)
    with pytest.raises(PermissionDenied) as raised:
        authorize(principal, frozenset({access_pb2.ROLE_ADMIN}), "acme")
    assert raised.value.reason == "ROLE_NOT_ALLOWED"


# Development tokens


@pytest.mark.parametrize(
    ("role", "merchant_id", "ttl"),
    [("root", None, 60), ("app", None, 60), ("admin", "", 60), ("platform", None, 0)],
)
def test_dev_token_refuses_impossible_tokens(role: str, merchant_id: str | None, ttl: int) -> None:
    with pytest.raises(ValueError):
        issue_dev_token(SETTINGS, role=role, merchant_id=merchant_id, ttl_seconds=ttl)


def test_dev_token_cli_prints_a_valid_token(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--role", "admin", "--merchant", "acme", "--subject", "alice"])
    token = capsys.readouterr().out.strip()
    assert VERIFIER.verify(token) == Principal(
        subject="alice", role=access_pb2.ROLE_ADMIN, merchant_id="acme"
    )


def test_make_dev_token_command_line() -> None:
    # Exactly what `make dev-token ROLE=admin MERCHANT=acme` runs.
    result = subprocess.run(
        [sys.executable, "-m", "tally_kit.auth", "--role", "admin", "--merchant", "acme"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "", "TALLY_JWT_SECRET": "a-secret-only-this-test-knows-0123456789"},
    )
    settings = ServiceSettings(jwt_secret=SecretStr("a-secret-only-this-test-knows-0123456789"))
    assert TokenVerifier(settings).verify(result.stdout.strip()).merchant_id == "acme"


# Remembered verifications


def counting_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token PyJWT verifies from now on (the real verification still runs)."""
    decoded: list[str] = []
    real_decode = jwt.decode

    def decode(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", decode)
    return decoded


def test_a_token_is_verified_once_then_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = counting_decodes(monkeypatch)
    verifier = TokenVerifier(SETTINGS)
    token = jwt.encode(claims(), SECRET)
    first = verifier.verify(token)
    assert verifier.verify(token) == first
    assert decoded == [token]
    other = jwt.encode(claims(sub="user-2"), SECRET)
    assert verifier.verify(other).subject == "user-2"
    assert decoded == [token, other]


def test_a_remembered_token_expires_and_a_refusal_is_never_remembered() -> None:
    verifier = TokenVerifier(SETTINGS.model_copy(update={"jwt_leeway_seconds": 0}))
    instant = int(time.time()) + 2
    expiring = jwt.encode(claims(exp=instant), SECRET)
    not_yet_valid = jwt.encode(claims(nbf=instant), SECRET)
    assert verifier.verify(expiring).subject == "user-1"
    assert refusal_reason(verifier, not_yet_valid) == "TOKEN_INVALID"
    time.sleep(max(0.0, instant - time.time()) + 0.05)
    assert refusal_reason(verifier, expiring) == "TOKEN_EXPIRED"
    assert verifier.verify(not_yet_valid).subject == "user-1"


def test_a_remembered_token_is_verified_again_after_the_maximum_age(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "VERIFIED_TOKEN_MAX_AGE_SECONDS", 0.2)
    decoded = counting_decodes(monkeypatch)
    verifier = TokenVerifier(SETTINGS)
    token = jwt.encode(claims(), SECRET)
    verifier.verify(token)
    verifier.verify(token)
    assert len(decoded) == 1
    time.sleep(0.25)
    verifier.verify(token)
    assert len(decoded) == 2


async def test_a_remembered_token_needs_no_key_fetch(es256_jwks_url, monkeypatch: pytest.MonkeyPatch) -> None:
    key, url = es256_jwks_url
    verifier = TokenVerifier(ServiceSettings(jwt_algorithms=["ES256"], jwt_jwks_url=url))
    token = jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "ec-1"})
    principal = await verifier.verify_async(token)

    def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a remembered token must be answered on the event loop")

    monkeypatch.setattr(auth.asyncio, "to_thread", no_thread)
    assert await verifier.verify_async(token) == principal
