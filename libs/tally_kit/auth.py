"""JWT bearer tokens, the caller's `Principal`, and the role policy declared on each RPC.

Tokens carry `sub`, `role` (app, admin, platform or service), `merchant_id` (required for
app and admin), `aud`, `iss` and `exp`. The roles an RPC needs are declared once, on the
RPC, with the `(tally.common.v1.access)` option. `platform` and `service` may act on any
merchant; `app` and `admin` only on their token's merchant.

A verified token is remembered (token → principal) until its `exp` plus the allowed
clock skew, and at most `VERIFIED_TOKEN_MAX_AGE_SECONDS`, so a caller that sends the same
token on every call is verified once, not on every call. Refusals are never remembered.

`python -m tally_kit.auth --role admin --merchant acme` prints a development token.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from google.protobuf import descriptor_pool
from tally.common.v1 import access_pb2
from tally.common.v1.access_pb2 import Role

from tally_kit.cache import ExpiringCache
from tally_kit.errors import PermissionDenied, Unauthenticated, Unavailable
from tally_kit.settings import ServiceSettings

ROLE_BY_CLAIM: dict[str, Role] = {
    "app": access_pb2.ROLE_APP,
    "admin": access_pb2.ROLE_ADMIN,
    "platform": access_pb2.ROLE_PLATFORM,
    "service": access_pb2.ROLE_SERVICE,
}
# Roles whose token names one merchant and may act on that merchant only.
MERCHANT_BOUND_ROLES = frozenset({access_pb2.ROLE_APP, access_pb2.ROLE_ADMIN})

_SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_REQUIRED_CLAIMS = ["sub", "aud", "iss", "exp"]
DEV_TOKEN_ALGORITHM = "HS256"
# Verified tokens remembered at once; the least recently used are forgotten first.
VERIFIED_TOKENS_MAX_ENTRIES = 4096
# A remembered token is verified again after this long even if it expires later, so that a
# signing key withdrawn from the JWKS stops being honoured within the time PyJWKClient
# itself keeps a fetched key set (300 s).
VERIFIED_TOKEN_MAX_AGE_SECONDS = 300.0


@dataclass(frozen=True)
class Principal:
    """Who is calling, as proven by a verified token."""

    subject: str
    role: Role
    merchant_id: str | None

    @property
    def role_name(self) -> str:
        return access_pb2.Role.Name(self.role)


# The verified caller of the current RPC; set by the server interceptor, None for public RPCs.
current_principal: ContextVar[Principal | None] = ContextVar("current_principal", default=None)


class TokenVerifier:
    """Verifies bearer tokens against the settings' algorithms, keys, audience and issuer."""

    def __init__(self, settings: ServiceSettings) -> None:
        algorithms = frozenset(settings.jwt_algorithms)
        supported = frozenset(jwt.algorithms.get_default_algorithms()) - {"none"}
        if not algorithms or not algorithms <= supported:
            raise ValueError(f"jwt_algorithms must be a non-empty subset of {sorted(supported)}")
        self._algorithms = algorithms
        self._secret = settings.jwt_secret.get_secret_value().encode()
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_seconds
        # Public keys by kid. A key file wins over a key URL, whose keys are fetched lazily
        # (over blocking HTTP, see verify_async) and cached.
        self._public_key: Callable[[str], jwt.PyJWK] | None = None
        self._fetches_keys = False
        if settings.jwt_jwks_file:
            self._public_key = jwt.PyJWKSet.from_json(Path(settings.jwt_jwks_file).read_text()).__getitem__
        elif settings.jwt_jwks_url:
            self._public_key = jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True).get_signing_key
            self._fetches_keys = True
        if algorithms - _SYMMETRIC_ALGORITHMS and self._public_key is None:
            raise ValueError("asymmetric jwt_algorithms need jwt_jwks_file or jwt_jwks_url")
        self._verified: ExpiringCache[str, Principal] = ExpiringCache(VERIFIED_TOKENS_MAX_ENTRIES)

    def verify(self, token: str) -> Principal:
        """The principal a valid token proves; `Unauthenticated` with a reason otherwise."""
        principal = self._verified.get(token)
        if principal is None:
            principal, valid_until = self._verify_signed(token)
            self._verified.put(
                token, principal, min(valid_until, time.time() + VERIFIED_TOKEN_MAX_AGE_SECONDS)
            )
        return principal

    async def verify_async(self, token: str) -> Principal:
        """`verify` without blocking the event loop while keys are fetched from the JWKS URL."""
        if not self._fetches_keys:
            return self.verify(token)
        # A remembered token needs no key: answer it on the loop rather than in a thread.
        return self._verified.get(token) or await asyncio.to_thread(self.verify, token)

    def _verify_signed(self, token: str) -> tuple[Principal, float]:
        """The token's principal and the instant (epoch seconds) until which PyJWT accepts it."""
        if not token:
            raise Unauthenticated("a bearer token is required", reason="TOKEN_MISSING")
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if not isinstance(algorithm, str) or algorithm not in self._algorithms:
                raise Unauthenticated(f"token algorithm {algorithm!r} is not allowed", reason="TOKEN_INVALID")
            claims = jwt.decode(
                token,
                self._key_for(algorithm, header.get("kid")),
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token is for another audience", reason="TOKEN_AUDIENCE_MISMATCH") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token is from an unknown issuer", reason="TOKEN_ISSUER_MISMATCH") from None
        except jwt.PyJWKClientConnectionError:
            # The key server is down: the token may well be valid, so the caller should retry.
            raise Unavailable("signing keys are unavailable", reason="JWKS_UNAVAILABLE") from None
        except jwt.PyJWTError:
            raise Unauthenticated("token is invalid", reason="TOKEN_INVALID") from None
        # PyJWT refuses a token once `exp <= now - leeway`, with `exp` read as an integer.
        return _principal_from(claims), int(claims["exp"]) + self._leeway

    def _key_for(self, algorithm: str, kid: Any) -> bytes | jwt.PyJWK:
        if algorithm in _SYMMETRIC_ALGORITHMS:
            return self._secret
        if self._public_key is None or not isinstance(kid, str) or not kid:
            raise Unauthenticated("token names no known signing key (kid)", reason="TOKEN_KEY_UNKNOWN")
        try:
            return self._public_key(kid)
        except jwt.PyJWKClientConnectionError:
            raise
        except (KeyError, jwt.PyJWKClientError):
            raise Unauthenticated(f"no signing key {kid!r}", reason="TOKEN_KEY_UNKNOWN") from None


def _principal_from(claims: dict[str, Any]) -> Principal:
    role = ROLE_BY_CLAIM.get(claims.get("role"))
    if role is None:
        raise Unauthenticated("token has no valid role", reason="TOKEN_ROLE_INVALID")
    merchant_id = claims.get("merchant_id") or None
    if merchant_id is not None and not isinstance(merchant_id, str):
        raise Unauthenticated("token merchant_id must be a string", reason="TOKEN_INVALID")
    if role in MERCHANT_BOUND_ROLES and merchant_id is None:
        raise Unauthenticated("app and admin tokens must name a merchant", reason="TOKEN_MERCHANT_MISSING")
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("token subject must be a non-empty string", reason="TOKEN_INVALID")
    return Principal(subject=subject, role=role, merchant_id=merchant_id)


def issue_dev_token(
    settings: ServiceSettings,
    *,
    role: str,
    merchant_id: str | None,
    subject: str = "dev",
    ttl_seconds: int = 3600,
) -> str:
    """An HS256 token signed with `settings.jwt_secret`, for development and tests."""
    if role not in ROLE_BY_CLAIM:
        raise ValueError(f"role must be one of {sorted(ROLE_BY_CLAIM)}")
    if ROLE_BY_CLAIM[role] in MERCHANT_BOUND_ROLES and not merchant_id:
        raise ValueError(f"a {role} token needs a merchant_id")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "role": role,
        "aud": settings.jwt_audience,
        "iss": settings.jwt_issuer,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if merchant_id:
        claims["merchant_id"] = merchant_id
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm=DEV_TOKEN_ALGORITHM)


@functools.cache
def required_roles(full_method: str) -> frozenset[Role] | None:
    """Roles the `(tally.common.v1.access)` option of `/package.Service/Method` allows.

    An empty set means the RPC needs no token; None means the RPC declares no policy (or is
    unknown to the default descriptor pool) and must be refused.
    """
    service_name, _, method_name = full_method.lstrip("/").partition("/")
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        return None
    method = service.methods_by_name.get(method_name)
    if method is None:
        return None
    options = method.GetOptions()
    if not options.HasExtension(access_pb2.access):
        return None
    return frozenset(options.Extensions[access_pb2.access].roles)


def authorize(principal: Principal, roles: frozenset[Role], merchant_id: str | None) -> None:
    """Refuse with PermissionDenied unless `principal` may call an RPC for `roles` on `merchant_id`.

    `merchant_id` is the request's merchant, None when the request names none.
    """
    if principal.role not in roles:
        raise PermissionDenied(f"role {principal.role_name} may not call this RPC", reason="ROLE_NOT_ALLOWED")
    if (
        merchant_id is not None
        and principal.role in MERCHANT_BOUND_ROLES
        and merchant_id != principal.merchant_id
    ):
        raise PermissionDenied("the token is not valid for this merchant", reason="MERCHANT_MISMATCH")


class ServiceToken:
    """A service's own bearer token, sent on calls made outside any incoming call.

    In production the token is configured (a secret). In development, with none configured,
    one is minted with the kit's HS256 secret for role `service`, and minted again once less
    than `refresh_margin_seconds` of its lifetime is left, so a long-running process never
    sends an expired one.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        subject: str | None = None,
        ttl_seconds: int = 3600,
        refresh_margin_seconds: int = 300,
    ) -> None:
        if not 0 < refresh_margin_seconds < ttl_seconds:
            raise ValueError("refresh_margin_seconds must be positive and below ttl_seconds")
        self._settings = settings
        self._subject = subject or settings.service_name
        self._configured = settings.service_token.get_secret_value()
        self._ttl_seconds = ttl_seconds
        self._refresh_margin_seconds = refresh_margin_seconds
        self._minted = ""
        self._refresh_at = 0.0

    def __call__(self) -> str:
        if self._configured:
            return self._configured
        now = time.time()
        if now >= self._refresh_at:
            self._minted = issue_dev_token(
                self._settings,
                role="service",
                merchant_id=None,
                subject=self._subject,
                ttl_seconds=self._ttl_seconds,
            )
            self._refresh_at = now + self._ttl_seconds - self._refresh_margin_seconds
        return self._minted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tally_kit.auth", description="Print a development JWT.")
    parser.add_argument("--role", required=True, choices=sorted(ROLE_BY_CLAIM))
    parser.add_argument("--merchant", help="merchant id; required for app and admin")
    parser.add_argument("--subject", default="dev")
    parser.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    args = parser.parse_args(argv)
    try:
        token = issue_dev_token(
            ServiceSettings(),
            role=args.role,
            merchant_id=args.merchant,
            subject=args.subject,
            ttl_seconds=args.ttl,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(token)


if __name__ == "__main__":
    main()
