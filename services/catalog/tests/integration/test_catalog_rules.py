"""The catalog's rules as a client sees them over the wire: effective dates, operation-type
versions that never overlap, price versions, and archived products that are never offered.

Scheduled changes take effect by moving the service's clock forward, not by waiting.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc
import pytest
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.catalog.v1 import resources_pb2 as res
from tally.common.v1.money_pb2 import Credits, Money
from tally_catalog.testing import Catalog, ServiceClock, instant, new_id, new_merchant_id, timestamp

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def merchant_id(catalog: Catalog) -> str:
    merchant_id = new_merchant_id("rules")
    await catalog.create_merchant(merchant_id)
    return merchant_id


@pytest.fixture(scope="module")
def clock(catalog: Catalog) -> ServiceClock:
    assert catalog.clock is not None
    return catalog.clock


async def test_an_effective_time_in_the_past_is_refused_naming_the_field(
    catalog: Catalog, merchant_id: str, clock: ServiceClock
) -> None:
    product = await catalog.create_product(merchant_id)
    yesterday = timestamp(clock() - timedelta(days=1))

    price = await catalog.refuse(
        "ScheduleProductPrice",
        api.ScheduleProductPriceRequest(
            merchant_id=merchant_id,
            product_id=product.product_id,
            request_id=new_id(),
            price=Money(amount_minor=990, currency="EUR"),
            effective_time=yesterday,
        ),
    )
    version = await catalog.refuse(
        "ScheduleOperationTypeVersion",
        api.ScheduleOperationTypeVersionRequest(
            merchant_id=merchant_id,
            operation_code="past.rate",
            request_id=new_id(),
            resource_unit="token",
            credits_per_unit=Credits(value="1"),
            effective_time=yesterday,
        ),
    )

    for refusal in (price, version):
        assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refusal.fields == ("effective_time",)
    prices = await catalog.call(
        "ListProductPrices",
        api.ListProductPricesRequest(merchant_id=merchant_id, product_id=product.product_id),
    )
    versions = await catalog.call(
        "ListOperationTypeVersions",
        api.ListOperationTypeVersionsRequest(merchant_id=merchant_id, operation_code="past.rate"),
    )
    assert list(prices.prices) == [] and list(versions.operation_type_versions) == []


async def test_exactly_one_operation_type_version_is_active_at_any_instant(
    catalog: Catalog, merchant_id: str, clock: ServiceClock
) -> None:
    code = "llm.tokens"
    first = (await catalog.schedule_operation_type(merchant_id, code, "0.001")).operation_type_version
    start = instant(first.effective_time)
    second_start, third_start = start + timedelta(days=7), start + timedelta(days=30)
    await catalog.schedule_operation_type(merchant_id, code, "0.002", effective=second_start)
    third = await catalog.schedule_operation_type(merchant_id, code, "0.0015", effective=third_start)
    assert third.operation_type_version.version == 3
    assert instant(third.previous_version.end_time) == third_start

    async def active_at(moment: datetime | None) -> int:
        request = api.GetActiveOperationTypeVersionRequest(merchant_id=merchant_id, operation_code=code)
        if moment is not None:
            request.read_time.CopyFrom(timestamp(moment))
        response = await catalog.call("GetActiveOperationTypeVersion", request)
        return response.operation_type_version.version

    microsecond = timedelta(microseconds=1)
    assert [
        await active_at(moment)
        for moment in (
            start,
            second_start - microsecond,
            second_start,
            third_start - microsecond,
            third_start,
            third_start + timedelta(days=3650),
            None,  # now
        )
    ] == [1, 1, 2, 2, 3, 3, 1]
    before_first = await catalog.refuse(
        "GetActiveOperationTypeVersion",
        api.GetActiveOperationTypeVersionRequest(
            merchant_id=merchant_id, operation_code=code, read_time=timestamp(start - microsecond)
        ),
    )
    assert (before_first.code, before_first.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "OPERATION_TYPE_NOT_ACTIVE",
    )

    # The versions chain with no gap and no overlap: each ends where the next starts.
    listed = await catalog.call(
        "ListOperationTypeVersions",
        api.ListOperationTypeVersionsRequest(merchant_id=merchant_id, operation_code=code),
    )
    versions = list(listed.operation_type_versions)
    assert [v.version for v in versions] == [1, 2, 3]
    assert [v.end_time for v in versions[:-1]] == [v.effective_time for v in versions[1:]]
    assert not versions[-1].HasField("end_time")

    # A version starting at or before the latest one's start is refused, and changes nothing.
    for overlapping_start in (second_start + timedelta(days=1), third_start):
        overlap = await catalog.refuse(
            "ScheduleOperationTypeVersion",
            api.ScheduleOperationTypeVersionRequest(
                merchant_id=merchant_id,
                operation_code=code,
                request_id=new_id(),
                resource_unit="token",
                credits_per_unit=Credits(value="0.003"),
                effective_time=timestamp(overlapping_start),
            ),
        )
        assert (overlap.code, overlap.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "OPERATION_TYPE_VERSION_OVERLAP",
        )
    unchanged = await catalog.call(
        "ListOperationTypeVersions",
        api.ListOperationTypeVersionsRequest(merchant_id=merchant_id, operation_code=code),
    )
    assert list(unchanged.operation_type_versions) == versions

    # As the clock passes the second version's start, "now" reads the second version.
    clock.advance(second_start - clock() + timedelta(seconds=1))
    assert await active_at(None) == 2


async def test_a_new_price_archives_the_previous_one_at_its_effective_time(
    catalog: Catalog, merchant_id: str, clock: ServiceClock
) -> None:
    product = await catalog.create_product(merchant_id)
    first = (await catalog.schedule_price(merchant_id, product.product_id, 990)).price
    in_dollars = (await catalog.schedule_price(merchant_id, product.product_id, 1100, currency="USD")).price
    change_at = instant(first.effective_time) + timedelta(days=14)
    second = await catalog.schedule_price(merchant_id, product.product_id, 1290, effective=change_at)

    assert second.previous_price.price_id == first.price_id
    assert instant(second.previous_price.archive_time) == change_at == instant(second.price.effective_time)
    assert not second.price.HasField("archive_time")

    listed = await catalog.call(
        "ListProductPrices",
        api.ListProductPricesRequest(merchant_id=merchant_id, product_id=product.product_id),
    )
    # By currency, then time; the dollar price is untouched by the euro change.
    assert [(p.amount.currency, p.amount.amount_minor) for p in listed.prices] == [
        ("EUR", 990),
        ("EUR", 1290),
        ("USD", 1100),
    ]
    assert listed.prices[0] == second.previous_price and listed.prices[2] == in_dollars

    def in_effect(moment: datetime) -> list[int]:
        return [
            p.amount.amount_minor
            for p in listed.prices
            if p.amount.currency == "EUR"
            and instant(p.effective_time) <= moment
            and (not p.HasField("archive_time") or moment < instant(p.archive_time))
        ]

    assert in_effect(change_at - timedelta(microseconds=1)) == [990]
    assert in_effect(change_at) == [1290]

    overlap = await catalog.refuse(
        "ScheduleProductPrice",
        api.ScheduleProductPriceRequest(
            merchant_id=merchant_id,
            product_id=product.product_id,
            request_id=new_id(),
            price=Money(amount_minor=1090, currency="EUR"),
            effective_time=timestamp(change_at - timedelta(days=1)),
        ),
    )
    assert (overlap.code, overlap.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PRICE_VERSION_OVERLAP")

    # Offers follow the clock: the first price until the change, the second from then on.
    async def offered_amount() -> int:
        offer = await catalog.call(
            "GetOffer", api.GetOfferRequest(merchant_id=merchant_id, product_id=product.product_id)
        )
        offers = await catalog.call(
            "ListOffers", api.ListOffersRequest(merchant_id=merchant_id, page_size=500)
        )
        listed_amounts = [
            o.price.amount.amount_minor for o in offers.offers if o.product == offer.offer.product
        ]
        assert listed_amounts == [offer.offer.price.amount.amount_minor]
        return offer.offer.price.amount.amount_minor

    assert await offered_amount() == 990
    clock.advance(change_at - clock())
    assert await offered_amount() == 1290


async def test_archived_products_are_not_offered(catalog: Catalog, merchant_id: str) -> None:
    product = await catalog.create_product(merchant_id)
    await catalog.schedule_price(merchant_id, product.product_id, 490)
    offer_request = api.GetOfferRequest(merchant_id=merchant_id, product_id=product.product_id)
    offered = await catalog.call("GetOffer", offer_request)
    assert offered.offer.product.product_id == product.product_id

    archived = await catalog.call(
        "ArchiveProduct",
        api.ArchiveProductRequest(
            merchant_id=merchant_id, product_id=product.product_id, request_id=new_id()
        ),
    )
    assert archived.product.state == res.PRODUCT_STATE_ARCHIVED

    refused = await catalog.refuse("GetOffer", offer_request)
    assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PRODUCT_ARCHIVED")
    offers = await catalog.call("ListOffers", api.ListOffersRequest(merchant_id=merchant_id, page_size=500))
    assert product.product_id not in [o.product.product_id for o in offers.offers]
    repriced = await catalog.refuse(
        "ScheduleProductPrice",
        api.ScheduleProductPriceRequest(
            merchant_id=merchant_id,
            product_id=product.product_id,
            request_id=new_id(),
            price=Money(amount_minor=590, currency="EUR"),
        ),
    )
    assert (repriced.code, repriced.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PRODUCT_ARCHIVED")

    # Still readable, and listed only when archived products are asked for.
    listed = await catalog.call(
        "ListProducts", api.ListProductsRequest(merchant_id=merchant_id, page_size=500)
    )
    assert product.product_id not in [p.product_id for p in listed.products]
    everything = await catalog.call(
        "ListProducts", api.ListProductsRequest(merchant_id=merchant_id, page_size=500, show_archived=True)
    )
    assert archived.product in everything.products
