"""Idempotency over the wire (AIP-155), on every mutating RPC: a replay gets the first response
and changes nothing; the same request_id with another payload is refused; a burst of
identical concurrent requests has exactly one effect and one event."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.catalog.v1 import events_pb2
from tally_catalog.testing import (
    MUTATING_RPCS,
    MUTATIONS,
    Catalog,
    Mutation,
    broken,
    new_id,
    new_merchant_id,
    sellable_product,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def merchant_id(catalog: Catalog) -> str:
    merchant_id = new_merchant_id("idem")
    await catalog.create_merchant(merchant_id)
    return merchant_id


def test_every_mutating_rpc_is_covered() -> None:
    assert sorted(MUTATIONS) == sorted(MUTATING_RPCS)


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=list(MUTATIONS))
async def test_a_replay_returns_the_first_response_and_changes_nothing(
    catalog: Catalog, merchant_id: str, mutation: Mutation
) -> None:
    request = await mutation.prepare(catalog, merchant_id)
    target = request.merchant_id  # type: ignore[attr-defined]
    first = await catalog.call(mutation.rpc, request)
    before = await catalog.databases.snapshot(target)

    replay_correlation = new_id()
    replay = await catalog.call(mutation.rpc, request, correlation_id=replay_correlation)

    assert replay.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
    assert await catalog.databases.snapshot(target) == before
    assert [
        row for row in await catalog.databases.outbox(target) if row.correlation_id == replay_correlation
    ] == []


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=list(MUTATIONS))
async def test_a_request_id_reused_for_another_payload_is_refused(
    catalog: Catalog, merchant_id: str, mutation: Mutation
) -> None:
    request = await mutation.prepare(catalog, merchant_id)
    target = request.merchant_id  # type: ignore[attr-defined]
    await catalog.call(mutation.rpc, request)
    before = await catalog.databases.snapshot(target)

    refusal = await catalog.refuse(mutation.rpc, broken(request, mutation.another_payload))

    assert (refusal.code, refusal.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await catalog.databases.snapshot(target) == before


async def test_concurrent_identical_requests_create_one_product(catalog: Catalog, merchant_id: str) -> None:
    name = f"Burst {new_id()}"
    request = api.CreateProductRequest(
        merchant_id=merchant_id, request_id=new_id(), product=sellable_product(name=name)
    )
    correlations = [new_id() for _ in range(20)]

    responses = await asyncio.gather(
        *(catalog.call("CreateProduct", request, correlation_id=c) for c in correlations)
    )

    assert len({response.SerializeToString(deterministic=True) for response in responses}) == 1
    product = responses[0].product
    listed = await catalog.call(
        "ListProducts", api.ListProductsRequest(merchant_id=merchant_id, page_size=500)
    )
    assert [p for p in listed.products if p.name == name] == [product]
    rows = await catalog.databases.fetch(
        merchant_id, "SELECT count(*) AS n FROM products WHERE name = $1", name
    )
    assert rows[0]["n"] == 1

    outbox = [
        row for row in await catalog.databases.outbox(merchant_id) if row.correlation_id in correlations
    ]
    assert len(outbox) == 1
    published = await catalog.published_events(merchant_id, outbox[0].correlation_id)
    assert [event.payload for event in published] == [events_pb2.ProductCreated(product=product)]
    others = [c for c in correlations if c != outbox[0].correlation_id]
    assert [event for c in others for event in catalog.events.of_call(c)] == []
