"""Events as a consumer receives them from RabbitMQ: every change publishes exactly one event
under its routing key, with the full resource, its merchant and the caller's `x-request-id`
as correlation id; a refused call publishes nothing."""

from __future__ import annotations

import grpc
import pytest
from tally_catalog.testing import MUTATIONS, PRODUCER, Catalog, Mutation, new_id, new_merchant_id

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def merchant_id(catalog: Catalog) -> str:
    merchant_id = new_merchant_id("events")
    await catalog.create_merchant(merchant_id)
    return merchant_id


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=list(MUTATIONS))
async def test_each_change_publishes_exactly_one_event_with_the_full_resource(
    catalog: Catalog, merchant_id: str, mutation: Mutation
) -> None:
    request = await mutation.prepare(catalog, merchant_id)
    target = request.merchant_id  # type: ignore[attr-defined]
    correlation_id = new_id()

    response = await catalog.call(mutation.rpc, request, correlation_id=correlation_id)
    published = await catalog.published_events(target, correlation_id)

    assert len(published) == 1, published
    event = published[0]
    assert event.routing_key == event.envelope.event_type == mutation.event_type
    assert event.envelope.merchant_id == target
    assert event.envelope.correlation_id == event.correlation_id == correlation_id
    assert event.envelope.producer == PRODUCER
    assert event.message_id == event.envelope.event_id and event.persistent
    assert event.payload == mutation.expected_event(response)


@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=list(MUTATIONS))
async def test_a_refused_change_publishes_nothing(
    catalog: Catalog, merchant_id: str, mutation: Mutation
) -> None:
    request = await mutation.prepare_refused(catalog, merchant_id)
    refused_correlation = new_id()
    before = await catalog.databases.snapshot(merchant_id)

    refusal = await catalog.refuse(mutation.rpc, request, correlation_id=refused_correlation)
    assert (refusal.code, refusal.reason) == (mutation.refused_code, mutation.refused_reason)

    # A change committed after the refusal, on the same merchant, is published after anything
    # the refusal could have left behind: once it arrives, nothing else can be on its way.
    assert await catalog.databases.snapshot(merchant_id) == before
    barrier = await MUTATIONS["CreateProduct"].prepare(catalog, merchant_id)
    barrier_correlation = new_id()
    await catalog.call("CreateProduct", barrier, correlation_id=barrier_correlation)
    assert len(await catalog.published_events(merchant_id, barrier_correlation)) == 1
    assert catalog.events.of_call(refused_correlation) == []


async def test_a_refused_change_leaves_its_request_id_free(catalog: Catalog, merchant_id: str) -> None:
    """Nothing of a refused change is kept, not even its idempotency key: the same request_id
    then serves a request that succeeds."""
    refused = await MUTATIONS["ArchiveProduct"].prepare_refused(catalog, merchant_id)
    refusal = await catalog.refuse("ArchiveProduct", refused)
    assert refusal.code == grpc.StatusCode.FAILED_PRECONDITION

    fresh = await MUTATIONS["ArchiveProduct"].prepare(catalog, merchant_id)
    fresh.request_id = refused.request_id  # type: ignore[attr-defined]
    archived = await catalog.call("ArchiveProduct", fresh)
    assert archived.product.product_id == fresh.product_id  # type: ignore[attr-defined]
