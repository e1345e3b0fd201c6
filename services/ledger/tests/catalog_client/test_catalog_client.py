"""`GrpcCatalogReader` against the real catalog app: mapping, errors, caching, operation-type
timelines, token forwarding, and serving from the cache while the catalog is down."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import jwt
import pytest
from catalog_harness import RunningCatalog, client_calls, new_merchant_id
from prometheus_client import REGISTRY
from pydantic import SecretStr
from tally.catalog.v1 import resources_pb2 as res
from tally_kit import context as call_context
from tally_kit.auth import ServiceToken, TokenVerifier, issue_dev_token
from tally_kit.clients import BreakerPolicy
from tally_kit.errors import FailedPrecondition, NotFound, Unavailable
from tally_kit.settings import ServiceSettings
from tally_ledger.catalog import Distribution, GrantPolicy, MerchantTerms
from tally_ledger.catalog_client import CachePolicy, GrpcCatalogReader
from tally_ledger.domain import OperationRate

OpenReader = Callable[..., Awaitable[GrpcCatalogReader]]


def cache_requests(kind: str, result: str) -> float:
    value = REGISTRY.get_sample_value("tally_catalog_cache_requests_total", {"kind": kind, "result": result})
    return value or 0.0


async def test_products_map_to_templates(catalog: RunningCatalog, open_reader: OpenReader) -> None:
    merchant_id = new_merchant_id("map")
    await catalog.create_merchant(merchant_id)
    sellable = await catalog.create_product(merchant_id, credits="12.5", access_period_days=30)
    grant = await catalog.create_product(
        merchant_id, credits="5", grant_policy=res.GRANT_POLICY_MANUAL_GRANT, name="Bonus"
    )
    reader = await open_reader()

    template = await reader.product(merchant_id, uuid.UUID(sellable.product_id))
    assert template.product_id == uuid.UUID(sellable.product_id)
    assert template.name == "Starter pack"
    assert template.credits == Decimal("12.5")
    assert template.access_period_days == 30
    assert template.distribution is Distribution.SELLABLE
    assert template.grant_policy is None
    assert not template.archived

    granted = await reader.product(merchant_id, uuid.UUID(grant.product_id))
    assert (granted.distribution, granted.grant_policy) == (Distribution.GRANT, GrantPolicy.MANUAL_GRANT)
    assert granted.access_period_days is None


async def test_signup_products_are_the_active_apply_on_signup_grants(
    catalog: RunningCatalog, open_reader: OpenReader
) -> None:
    merchant_id = new_merchant_id("signup")
    await catalog.create_merchant(merchant_id)
    welcome = await catalog.create_product(merchant_id, grant_policy=res.GRANT_POLICY_APPLY_ON_SIGNUP)
    retired = await catalog.create_product(merchant_id, grant_policy=res.GRANT_POLICY_APPLY_ON_SIGNUP)
    await catalog.create_product(merchant_id, grant_policy=res.GRANT_POLICY_MANUAL_GRANT)
    await catalog.create_product(merchant_id)
    await catalog.archive_product(merchant_id, retired.product_id)
    reader = await open_reader()

    products = await reader.signup_products(merchant_id)
    assert [p.product_id for p in products] == [uuid.UUID(welcome.product_id)]
    assert products[0].grant_policy is GrantPolicy.APPLY_ON_SIGNUP


async def test_merchant_terms(catalog: RunningCatalog, open_reader: OpenReader) -> None:
    merchant_id = new_merchant_id("terms")
    await catalog.create_merchant(merchant_id, operation_timeout=timedelta(seconds=90))
    reader = await open_reader()
    assert await reader.merchant_terms(merchant_id) == MerchantTerms(operation_timeout=timedelta(seconds=90))


async def test_unknown_things_are_not_found_with_their_reasons(
    catalog: RunningCatalog, open_reader: OpenReader
) -> None:
    merchant_id = new_merchant_id("unknown")
    await catalog.create_merchant(merchant_id)
    reader = await open_reader()

    with pytest.raises(NotFound) as product:
        await reader.product(merchant_id, uuid.uuid4())
    assert product.value.reason == "PRODUCT_NOT_FOUND"
    with pytest.raises(NotFound) as merchant:
        await reader.product(new_merchant_id("ghost"), uuid.uuid4())
    assert merchant.value.reason == "MERCHANT_NOT_FOUND"
    with pytest.raises(NotFound) as malformed_merchant:
        await reader.merchant_terms("Not A Merchant")
    assert malformed_merchant.value.reason == "MERCHANT_NOT_FOUND"
    with pytest.raises(NotFound) as terms:
        await reader.merchant_terms(new_merchant_id("ghost"))
    assert terms.value.reason == "MERCHANT_NOT_FOUND"
    for code in ("never.scheduled", "Not A Code"):
        with pytest.raises(NotFound) as operation_type:
            await reader.operation_rate(merchant_id, code, datetime.now(UTC))
        assert operation_type.value.reason == "OPERATION_TYPE_NOT_FOUND"


async def test_cached_reads_send_no_call(catalog: RunningCatalog, open_reader: OpenReader) -> None:
    merchant_id = new_merchant_id("hits")
    await catalog.create_merchant(merchant_id)
    product = await catalog.create_product(merchant_id)
    await catalog.schedule_operation_type(merchant_id, "llm.tokens", "0.002")
    reader = await open_reader()
    product_id = uuid.UUID(product.product_id)

    first = await reader.product(merchant_id, product_id)
    await reader.merchant_terms(merchant_id)
    await reader.signup_products(merchant_id)
    await reader.operation_rate(merchant_id, "llm.tokens", datetime.now(UTC))
    methods = ("GetProduct", "GetMerchant", "ListProducts", "ListOperationTypeVersions")
    calls = {method: client_calls(method) for method in methods}
    hits = cache_requests("product", "hit")

    for _ in range(3):
        assert await reader.product(merchant_id, product_id) == first
        await reader.merchant_terms(merchant_id)
        await reader.signup_products(merchant_id)
        await reader.operation_rate(merchant_id, "llm.tokens", datetime.now(UTC))

    assert {m: client_calls(m) for m in calls} == calls, "cached reads must not call the catalog"
    assert cache_requests("product", "hit") == hits + 3


async def test_the_cache_is_bounded(catalog: RunningCatalog, open_reader: OpenReader) -> None:
    merchant_id = new_merchant_id("lru")
    await catalog.create_merchant(merchant_id)
    first = uuid.UUID((await catalog.create_product(merchant_id)).product_id)
    second = uuid.UUID((await catalog.create_product(merchant_id)).product_id)
    reader = await open_reader(cache=CachePolicy(max_entries=1))

    await reader.product(merchant_id, first)
    await reader.product(merchant_id, second)
    calls = client_calls("GetProduct")
    await reader.product(merchant_id, second)
    assert client_calls("GetProduct") == calls
    await reader.product(merchant_id, first)
    assert client_calls("GetProduct") == calls + 1, "the least recently used entry was evicted"


async def test_an_active_product_is_read_again_after_the_ttl_and_archiving_is_final(
    catalog: RunningCatalog, open_reader: OpenReader
) -> None:
    merchant_id = new_merchant_id("archive")
    await catalog.create_merchant(merchant_id)
    product = await catalog.create_product(merchant_id)
    product_id = uuid.UUID(product.product_id)
    reader = await open_reader(cache=CachePolicy(ttl_seconds=0))

    assert not (await reader.product(merchant_id, product_id)).archived
    await catalog.archive_product(merchant_id, product.product_id)
    assert (await reader.product(merchant_id, product_id)).archived
    calls = client_calls("GetProduct")
    assert (await reader.product(merchant_id, product_id)).archived
    assert client_calls("GetProduct") == calls, "an archived product never changes again"


async def test_operation_rate_timeline(catalog: RunningCatalog, open_reader: OpenReader) -> None:
    merchant_id = new_merchant_id("rates")
    await catalog.create_merchant(merchant_id)
    first = await catalog.schedule_operation_type(merchant_id, "llm.tokens", "0.002")
    started = first.effective_time.ToDatetime(tzinfo=UTC)
    reader = await open_reader()
    v1 = OperationRate("llm.tokens", 1, "token", Decimal("0.002"))
    v2 = OperationRate("llm.tokens", 2, "token", Decimal("0.003"))

    assert await reader.operation_rate(merchant_id, "llm.tokens", datetime.now(UTC)) == v1
    with pytest.raises(FailedPrecondition) as before:
        await reader.operation_rate(merchant_id, "llm.tokens", started - timedelta(seconds=1))
    assert before.value.reason == "OPERATION_TYPE_NOT_ACTIVE"

    # Scheduled after the reader cached the timeline in which version 1 is open-ended.
    next_start = datetime.now(UTC) + timedelta(hours=1)
    await catalog.schedule_operation_type(merchant_id, "llm.tokens", "0.003", effective=next_start)
    calls = client_calls("ListOperationTypeVersions")
    assert await reader.operation_rate(merchant_id, "llm.tokens", next_start + timedelta(hours=1)) == v2
    assert client_calls("ListOperationTypeVersions") == calls + 1, "past what it covered: read again"

    # Version 1 now has its end: every instant before it is certain.
    just_before = next_start - timedelta(microseconds=1)
    assert await reader.operation_rate(merchant_id, "llm.tokens", just_before) == v1
    assert await reader.operation_rate(merchant_id, "llm.tokens", datetime.now(UTC)) == v1
    assert client_calls("ListOperationTypeVersions") == calls + 1
    # Version 2 is open-ended: a successor may yet start before an instant in the future.
    assert await reader.operation_rate(merchant_id, "llm.tokens", next_start) == v2
    assert client_calls("ListOperationTypeVersions") == calls + 2


async def test_a_rate_before_the_first_version_starts(
    catalog: RunningCatalog, open_reader: OpenReader
) -> None:
    merchant_id = new_merchant_id("future")
    await catalog.create_merchant(merchant_id)
    start = datetime.now(UTC) + timedelta(days=1)
    await catalog.schedule_operation_type(
        merchant_id, "api.calls", "1", resource_unit="call", effective=start
    )
    reader = await open_reader()

    with pytest.raises(FailedPrecondition) as now:
        await reader.operation_rate(merchant_id, "api.calls", datetime.now(UTC))
    assert now.value.reason == "OPERATION_TYPE_NOT_ACTIVE"
    assert await reader.operation_rate(merchant_id, "api.calls", start) == OperationRate(
        "api.calls", 1, "call", Decimal("1")
    )


async def test_the_callers_token_is_forwarded(catalog: RunningCatalog, open_reader: OpenReader) -> None:
    merchant_id = new_merchant_id("forward")
    await catalog.create_merchant(merchant_id)
    product = await catalog.create_product(merchant_id)
    reader = await open_reader()

    app_token = issue_dev_token(catalog.settings, role="app", merchant_id=merchant_id)
    forwarded = call_context.bearer_token.set(app_token)
    try:
        template = await reader.product(merchant_id, uuid.UUID(product.product_id))
        assert template.product_id == uuid.UUID(product.product_id)
    finally:
        call_context.bearer_token.reset(forwarded)

    # Proof that the caller's token, not the service token, is what the catalog sees.
    forwarded = call_context.bearer_token.set("not-a-token")
    try:
        with pytest.raises(Unavailable) as refused:
            await reader.merchant_terms(merchant_id)
        assert refused.value.reason == "CATALOG_UNAVAILABLE"
    finally:
        call_context.bearer_token.reset(forwarded)


def test_the_service_token_is_minted_for_role_service_and_refreshed(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ServiceSettings()
    token = ServiceToken(settings, subject="ledger", ttl_seconds=600, refresh_margin_seconds=60)
    first = token()
    principal = TokenVerifier(settings).verify(first)
    assert (principal.role_name, principal.subject, principal.merchant_id) == ("ROLE_SERVICE", "ledger", None)
    assert token() == first, "reused while far from its expiry"

    later = time.time() + 541
    monkeypatch.setattr(time, "time", lambda: later)
    refreshed = token()
    assert refreshed != first
    assert jwt.decode(refreshed, options={"verify_signature": False})["exp"] == int(later) + 600


def test_a_configured_service_token_is_used_as_is() -> None:
    token = ServiceToken(ServiceSettings(service_token=SecretStr("configured.jwt.value")), subject="ledger")
    assert token() == "configured.jwt.value"


async def test_while_the_catalog_is_down_cached_reads_are_served_and_others_fail_fast(
    open_reader: OpenReader,
) -> None:
    catalog = RunningCatalog()
    await catalog.start()
    try:
        merchant_id = new_merchant_id("outage")
        await catalog.create_merchant(merchant_id)
        cached = await catalog.create_product(merchant_id)
        uncached = await catalog.create_product(merchant_id)
        await catalog.schedule_operation_type(merchant_id, "llm.tokens", "0.002")
        # Nothing stays fresh: every read asks the catalog, so a cached answer is served
        # only because the catalog cannot give one.
        reader = await open_reader(
            catalog,
            cache=CachePolicy(ttl_seconds=0, rate_staleness_seconds=0),
            breaker=BreakerPolicy(failure_threshold=2, reset_timeout_seconds=60),
        )
        template = await reader.product(merchant_id, uuid.UUID(cached.product_id))
        terms = await reader.merchant_terms(merchant_id)
        rate = await reader.operation_rate(merchant_id, "llm.tokens", datetime.now(UTC))

        await catalog.stop()
        stale = cache_requests("product", "stale_served")
        assert await reader.product(merchant_id, uuid.UUID(cached.product_id)) == template
        assert await reader.merchant_terms(merchant_id) == terms
        assert await reader.operation_rate(merchant_id, "llm.tokens", datetime.now(UTC)) == rate
        assert cache_requests("product", "stale_served") == stale + 1

        # The circuit is open by now: what is not cached fails at once, without a call.
        calls = client_calls("GetProduct")
        began = time.perf_counter()
        with pytest.raises(Unavailable) as down:
            await reader.product(merchant_id, uuid.UUID(uncached.product_id))
        assert down.value.reason == "CATALOG_UNAVAILABLE"
        assert time.perf_counter() - began < 0.5
        assert client_calls("GetProduct") == calls
    finally:
        await catalog.close()
