"""Isolation: one database per merchant, tokens bound to their merchant, roles per RPC.

Every refused call below is a request that would succeed for the platform, and leaves the
target merchant's database exactly as it was (checked with SQL).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import jwt
import pytest
from google.protobuf.message import Message
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.common.v1 import access_pb2
from tally_catalog.testing import (
    MUTATIONS,
    RPC_NAMES,
    SERVICE,
    Catalog,
    Subjects,
    new_merchant_id,
    valid_request,
)

pytestmark = pytest.mark.integration

# Who may call what, as the API promises it.
READS = frozenset(
    {
        "GetMerchant",
        "GetProduct",
        "ListProducts",
        "ListProductPrices",
        "GetOffer",
        "ListOffers",
        "GetOperationTypeVersion",
        "GetActiveOperationTypeVersion",
        "ListOperationTypeVersions",
        "GetSubscriptionPlan",
        "ListSubscriptionPlans",
    }
)
ADMIN_CHANGES = frozenset(
    {
        "UpdateMerchantConfig",
        "CreateProduct",
        "ArchiveProduct",
        "ScheduleProductPrice",
        "ScheduleOperationTypeVersion",
        "CreateSubscriptionPlan",
    }
)
PLATFORM_ONLY = frozenset({"CreateMerchant"})
ALLOWED: dict[str, frozenset[str]] = {
    "app": READS,
    "admin": READS | ADMIN_CHANGES,
    "service": READS,
    "platform": READS | ADMIN_CHANGES | PLATFORM_ONLY,
}


@pytest.fixture(scope="module")
async def merchant_a(catalog: Catalog) -> Subjects:
    return await catalog.seed(new_merchant_id("iso-a"))


@pytest.fixture(scope="module")
async def merchant_b(catalog: Catalog) -> Subjects:
    return await catalog.seed(new_merchant_id("iso-b"))


def request_on(rpc: str, subjects: Subjects) -> Message:
    """A request of `rpc` on the merchant itself (CreateMerchant then names that merchant)."""
    request = valid_request(rpc, subjects)
    request.merchant_id = subjects.merchant_id  # type: ignore[attr-defined]
    return request


def test_the_access_policy_declared_on_each_rpc_is_the_one_tested() -> None:
    role_names = {
        access_pb2.ROLE_APP: "app",
        access_pb2.ROLE_ADMIN: "admin",
        access_pb2.ROLE_PLATFORM: "platform",
        access_pb2.ROLE_SERVICE: "service",
    }
    declared = {
        method.name: {role_names[role] for role in method.GetOptions().Extensions[access_pb2.access].roles}
        for method in SERVICE.methods
    }
    promised = {rpc: {role for role, rpcs in ALLOWED.items() if rpc in rpcs} for rpc in RPC_NAMES}
    assert declared == promised


async def test_each_merchant_has_a_database_of_its_own(
    catalog: Catalog, merchant_a: Subjects, merchant_b: Subjects
) -> None:
    a, b = merchant_a.merchant_id, merchant_b.merchant_id
    databases = await catalog.databases.databases()
    assert {catalog.databases.merchant_database(a), catalog.databases.merchant_database(b)} <= databases
    assert catalog.databases.merchant_database(a) != catalog.databases.merchant_database(b)
    assert {(a, "ready"), (b, "ready")} <= await catalog.databases.placements()
    # Each database holds its own merchant only.
    for merchant_id in (a, b):
        rows = await catalog.databases.fetch(merchant_id, "SELECT merchant_id FROM merchant")
        assert [row["merchant_id"] for row in rows] == [merchant_id]


@pytest.mark.parametrize("role", ["app", "admin"])
async def test_a_merchant_token_is_refused_on_every_rpc_of_another_merchant(
    catalog: Catalog, merchant_a: Subjects, merchant_b: Subjects, role: str
) -> None:
    before = await catalog.databases.snapshot(merchant_b.merchant_id)
    outcomes = {}
    for rpc in RPC_NAMES:
        refusal = await catalog.refuse(
            rpc, request_on(rpc, merchant_b), role=role, merchant_id=merchant_a.merchant_id
        )
        outcomes[rpc] = (refusal.code, refusal.reason)
    # A role the RPC does not admit is refused as such before its merchant is even compared.
    assert outcomes == {
        rpc: (
            grpc.StatusCode.PERMISSION_DENIED,
            "MERCHANT_MISMATCH" if rpc in ALLOWED[role] else "ROLE_NOT_ALLOWED",
        )
        for rpc in RPC_NAMES
    }
    assert await catalog.databases.snapshot(merchant_b.merchant_id) == before


@pytest.mark.parametrize("role", ["app", "admin"])
async def test_a_merchant_token_works_on_its_own_merchant(
    catalog: Catalog, merchant_a: Subjects, role: str
) -> None:
    """The control of the refusals above: the same tokens on their own merchant."""
    a = merchant_a.merchant_id
    failures = {}
    for rpc in sorted(ALLOWED[role]):
        if rpc in READS:
            request = request_on(rpc, merchant_a)
        else:
            request = await MUTATIONS[rpc].prepare(catalog, a)
        try:
            await catalog.call(rpc, request, role=role, merchant_id=a)
        except grpc.aio.AioRpcError as error:
            failures[rpc] = error.code().name
    assert failures == {}


async def _merchant_ids_stored(catalog: Catalog, merchant_id: str) -> dict[str, set[str]]:
    """The merchant ids found in each table of a merchant database that has such a column."""
    tables = await catalog.databases.fetch(
        merchant_id,
        """
        SELECT table_name FROM information_schema.columns
         WHERE table_schema = 'public' AND column_name = 'merchant_id'
         ORDER BY table_name
        """,
    )
    stored = {}
    for row in tables:
        # An identifier from the catalog, quoted; it cannot be a bound parameter.
        values = await catalog.databases.fetch(
            merchant_id, f'SELECT DISTINCT merchant_id FROM "{row["table_name"]}"'
        )
        stored[row["table_name"]] = {value["merchant_id"] for value in values}
    return stored


async def test_no_row_of_one_merchant_exists_in_the_other_merchants_database(
    catalog: Catalog, merchant_a: Subjects, merchant_b: Subjects
) -> None:
    for own, other in ((merchant_a, merchant_b), (merchant_b, merchant_a)):
        stored = await _merchant_ids_stored(catalog, own.merchant_id)
        assert {"merchant", "products", "product_prices", "outbox"} <= set(stored)
        assert all(ids <= {own.merchant_id} for ids in stored.values()), stored
        assert stored["products"] == {own.merchant_id}

        found = await catalog.databases.fetch(
            own.merchant_id,
            "SELECT product_id FROM products WHERE product_id = ANY($1::uuid[])",
            [other.product_id, other.grant_product_id],
        )
        assert found == []
        # Over the wire too: the other merchant's product is unknown here, even to the platform.
        refusal = await catalog.refuse(
            "GetProduct", api.GetProductRequest(merchant_id=own.merchant_id, product_id=other.product_id)
        )
        assert (refusal.code, refusal.reason) == (grpc.StatusCode.NOT_FOUND, "PRODUCT_NOT_FOUND")


def _token(catalog: Catalog, merchant_id: str, **changes: object) -> str:
    """An admin token for the merchant, with claims or signature changed as a forger would."""
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": "e2e",
        "role": "admin",
        "merchant_id": merchant_id,
        "aud": catalog.settings.jwt_audience,
        "iss": catalog.settings.jwt_issuer,
        "iat": now,
        "exp": now + 600,
    }
    key = changes.pop("key", catalog.settings.jwt_secret.get_secret_value())
    algorithm = changes.pop("algorithm", "HS256")
    claims.update(changes)
    return jwt.encode(claims, key, algorithm=algorithm)  # type: ignore[arg-type]


BAD_TOKENS: dict[str, tuple[Callable[[Catalog, str], str | None], str]] = {
    "missing": (lambda catalog, merchant_id: None, "TOKEN_MISSING"),
    # Past the verifier's leeway.
    "expired": (lambda c, m: _token(c, m, exp=int(time.time()) - 3600), "TOKEN_EXPIRED"),
    "forged": (
        lambda c, m: _token(c, m, key="an-attackers-secret-of-sufficient-length-0123"),
        "TOKEN_INVALID",
    ),
    "unsigned": (lambda c, m: _token(c, m, key=None, algorithm="none"), "TOKEN_INVALID"),
    "for another audience": (lambda c, m: _token(c, m, aud="somebody-else"), "TOKEN_AUDIENCE_MISMATCH"),
    "not a JWT": (lambda c, m: "not-a-jwt", "TOKEN_INVALID"),
}


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_a_call_without_a_valid_token_is_unauthenticated(
    catalog: Catalog, merchant_a: Subjects, kind: str
) -> None:
    make_token, reason = BAD_TOKENS[kind]
    token = make_token(catalog, merchant_a.merchant_id)
    before = await catalog.databases.snapshot(merchant_a.merchant_id)
    outcomes = {}
    for rpc in RPC_NAMES:
        refusal = await catalog.refuse(rpc, request_on(rpc, merchant_a), role=None, token=token)
        outcomes[rpc] = (refusal.code, refusal.reason)
    assert outcomes == {rpc: (grpc.StatusCode.UNAUTHENTICATED, reason) for rpc in RPC_NAMES}
    assert await catalog.databases.snapshot(merchant_a.merchant_id) == before


async def test_an_app_token_cannot_call_admin_rpcs(catalog: Catalog, merchant_a: Subjects) -> None:
    a = merchant_a.merchant_id
    before = await catalog.databases.snapshot(a)
    outcomes = {}
    for rpc in sorted(ADMIN_CHANGES | PLATFORM_ONLY):
        refusal = await catalog.refuse(rpc, valid_request(rpc, merchant_a), role="app", merchant_id=a)
        outcomes[rpc] = (refusal.code, refusal.reason)
    assert outcomes == {
        rpc: (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED") for rpc in ADMIN_CHANGES | PLATFORM_ONLY
    }
    assert await catalog.databases.snapshot(a) == before


async def test_only_a_platform_token_can_create_a_merchant(catalog: Catalog, merchant_a: Subjects) -> None:
    for role, merchant_id in (
        ("app", merchant_a.merchant_id),
        ("admin", merchant_a.merchant_id),
        ("service", None),
    ):
        request = valid_request("CreateMerchant", merchant_a)
        refusal = await catalog.refuse("CreateMerchant", request, role=role, merchant_id=merchant_id)
        assert (refusal.code, refusal.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"), role
        assert (
            catalog.databases.merchant_database(request.merchant_id)
            not in await catalog.databases.databases()
        )

    request = valid_request("CreateMerchant", merchant_a)
    created = await catalog.call("CreateMerchant", request, role="platform")
    assert created.merchant.merchant_id == request.merchant_id
    assert catalog.databases.merchant_database(request.merchant_id) in await catalog.databases.databases()
