"""The servicer end to end below gRPC: real merchant directory, unit of work, idempotency and
outbox on the real PostgreSQL, with a clock the tests move."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.catalog.v1 import resources_pb2 as res
from tally.common.v1.event_pb2 import EventEnvelope
from tally.common.v1.money_pb2 import Credits, Money
from tally_catalog import events
from tally_catalog.servicer import CatalogServicer
from tally_catalog.settings import CatalogSettings
from tally_catalog.store import MIGRATIONS
from tally_kit import protobuf
from tally_kit.db.directory import MerchantDirectory
from tally_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, TallyError
from tally_kit.uow import Mutations

pytestmark = pytest.mark.integration

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class RecordingRelay:
    def __init__(self) -> None:
        self.notified: list[str] = []

    def notify(self, merchant_id: str) -> None:
        self.notified.append(merchant_id)


@pytest.fixture(scope="module")
async def directory(store_settings: CatalogSettings) -> AsyncIterator[MerchantDirectory]:
    settings = store_settings.model_copy(update={"db_pool_max_size": 2, "db_max_connections": 4})
    directory = MerchantDirectory(settings, [MIGRATIONS])
    await directory.start()
    yield directory
    await directory.close()


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def relay() -> RecordingRelay:
    return RecordingRelay()


@pytest.fixture(scope="module")
def servicer(directory: MerchantDirectory, relay: RecordingRelay, clock: Clock) -> CatalogServicer:
    return CatalogServicer(directory, Mutations(directory, relay, producer="catalog"), clock=clock)


def _config(**changes: object) -> res.MerchantConfig:
    config = res.MerchantConfig(
        legal_name="Acme SAS",
        tax_id="FR40303265045",
        address=res.PostalAddress(address_lines=["1 rue de la Paix"], locality="Paris", region_code="FR"),
        receipt_series_prefix="ACME",
        tax_regime=res.TaxRegime(rate_percent="20", prices_include_tax=True),
        operation_timeout=Duration(seconds=900),
        retention_days=3650,
        default_currency="EUR",
    )
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@pytest.fixture(scope="module")
async def acme(servicer: CatalogServicer) -> str:
    """A merchant shared by the tests of this module (each uses its own resources in it)."""
    await servicer.CreateMerchant(
        api.CreateMerchantRequest(merchant_id="acme", request_id="create-acme", config=_config()), None
    )
    return "acme"


async def _events(directory: MerchantDirectory, merchant_id: str, event_type: str) -> list[Message]:
    async with directory.connection(merchant_id) as conn:
        rows = await conn.fetch("SELECT envelope FROM outbox WHERE event_type = $1 ORDER BY id", event_type)
    payloads = []
    for row in rows:
        envelope = EventEnvelope.FromString(row["envelope"])
        assert envelope.merchant_id == merchant_id and envelope.producer == "catalog"
        payload = events.PAYLOAD_TYPES[event_type]()
        assert envelope.payload.Unpack(payload)
        payloads.append(payload)
    return payloads


async def _refusal(call: object, request: Message) -> TallyError:
    with pytest.raises(TallyError) as refused:
        await call(request, None)  # type: ignore[operator]
    return refused.value


# --- merchants --------------------------------------------------------------------------------


async def test_a_merchant_is_created_once_and_announced(
    servicer: CatalogServicer, directory: MerchantDirectory, relay: RecordingRelay
) -> None:
    request = api.CreateMerchantRequest(merchant_id="globex", request_id="create-globex", config=_config())
    created = await servicer.CreateMerchant(request, None)
    assert created.merchant.merchant_id == "globex" and created.merchant.config_revision == 1
    assert created.merchant.config == _config()
    assert created.merchant.create_time.ToDatetime(tzinfo=UTC) == T0
    assert "globex" in relay.notified

    # The same request again is the same answer; another request for the same id is refused.
    assert await servicer.CreateMerchant(request, None) == created
    again = await _refusal(
        servicer.CreateMerchant,
        api.CreateMerchantRequest(merchant_id="globex", request_id="create-globex-2", config=_config()),
    )
    assert isinstance(again, AlreadyExists) and again.reason == "MERCHANT_ALREADY_EXISTS"

    fetched = await servicer.GetMerchant(api.GetMerchantRequest(merchant_id="globex"), None)
    assert fetched.merchant == created.merchant
    assert [e.merchant for e in await _events(directory, "globex", events.MERCHANT_CREATED)] == [
        created.merchant
    ]


async def test_bad_input_never_reaches_a_database(
    servicer: CatalogServicer, directory: MerchantDirectory
) -> None:
    refused = await _refusal(
        servicer.CreateMerchant,
        api.CreateMerchantRequest(
            merchant_id="initech", request_id="r", config=_config(default_currency="XYZ")
        ),
    )
    assert isinstance(refused, InvalidArgument)
    assert [v.field for v in refused.violations] == ["config.default_currency"]
    assert not await directory.is_provisioned("initech")


async def test_an_unknown_merchant_is_not_found(servicer: CatalogServicer) -> None:
    refused = await _refusal(servicer.GetMerchant, api.GetMerchantRequest(merchant_id="nobody"))
    assert isinstance(refused, NotFound) and refused.reason == "MERCHANT_NOT_FOUND"


async def test_a_config_update_changes_the_masked_fields_and_bumps_the_revision(
    servicer: CatalogServicer, directory: MerchantDirectory, acme: str, clock: Clock
) -> None:
    before = (await servicer.GetMerchant(api.GetMerchantRequest(merchant_id=acme), None)).merchant
    clock.now = T0 + timedelta(hours=1)
    updated = await servicer.UpdateMerchantConfig(
        api.UpdateMerchantConfigRequest(
            merchant_id=acme,
            request_id="config-1",
            config=res.MerchantConfig(tax_regime=res.TaxRegime(rate_percent="5.5"), legal_name="ignored"),
            update_mask=FieldMask(paths=["tax_regime"]),
        ),
        None,
    )
    assert updated.merchant.config_revision == before.config_revision + 1
    assert updated.merchant.config.tax_regime == res.TaxRegime(rate_percent="5.5", prices_include_tax=False)
    assert updated.merchant.config.legal_name == "Acme SAS"
    assert updated.merchant.update_time.ToDatetime(tzinfo=UTC) == clock.now

    # Setting the same values again is no change: same revision, no new event.
    same = await servicer.UpdateMerchantConfig(
        api.UpdateMerchantConfigRequest(
            merchant_id=acme, request_id="config-2", config=res.MerchantConfig(retention_days=3650)
        ),
        None,
    )
    assert same.merchant == updated.merchant
    assert [e.merchant for e in await _events(directory, acme, events.MERCHANT_CONFIG_UPDATED)] == [
        updated.merchant
    ]


# --- products, prices, offers -----------------------------------------------------------------


async def _create_product(
    servicer: CatalogServicer, merchant_id: str, request_id: str, **fields: object
) -> res.Product:
    product = res.Product(
        name="Pack", credits=Credits(value="100"), distribution=res.PRODUCT_DISTRIBUTION_SELLABLE
    )
    for name, value in fields.items():
        setattr(product, name, value)
    response = await servicer.CreateProduct(
        api.CreateProductRequest(merchant_id=merchant_id, request_id=request_id, product=product), None
    )
    return response.product


async def test_a_product_is_created_archived_once_and_announced(
    servicer: CatalogServicer, directory: MerchantDirectory, acme: str
) -> None:
    product = await _create_product(servicer, acme, "product-archive", access_period_days=30)
    assert product.state == res.PRODUCT_STATE_ACTIVE and product.access_period_days == 30
    assert (
        await servicer.GetProduct(
            api.GetProductRequest(merchant_id=acme, product_id=product.product_id), None
        )
    ).product == product

    archive = api.ArchiveProductRequest(
        merchant_id=acme, product_id=product.product_id, request_id="archive-1"
    )
    archived = (await servicer.ArchiveProduct(archive, None)).product
    assert archived.state == res.PRODUCT_STATE_ARCHIVED and archived.HasField("archive_time")
    assert (await servicer.ArchiveProduct(archive, None)).product == archived
    archive.request_id = "archive-2"
    again = await _refusal(servicer.ArchiveProduct, archive)
    assert isinstance(again, FailedPrecondition) and again.reason == "PRODUCT_ARCHIVED"

    created = [e.product for e in await _events(directory, acme, events.PRODUCT_CREATED)]
    assert product in created
    assert archived in [e.product for e in await _events(directory, acme, events.PRODUCT_ARCHIVED)]


async def test_a_request_id_reused_for_another_payload_is_refused(
    servicer: CatalogServicer, acme: str
) -> None:
    first = await _create_product(servicer, acme, "product-idem")
    assert await _create_product(servicer, acme, "product-idem") == first
    with pytest.raises(AlreadyExists) as refused:
        await _create_product(servicer, acme, "product-idem", name="Another")
    assert refused.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_a_merchant_never_sees_another_merchants_products(servicer: CatalogServicer, acme: str) -> None:
    await servicer.CreateMerchant(
        api.CreateMerchantRequest(merchant_id="umbrella", request_id="create-umbrella", config=_config()),
        None,
    )
    product = await _create_product(servicer, acme, "product-isolation")
    refused = await _refusal(
        servicer.GetProduct, api.GetProductRequest(merchant_id="umbrella", product_id=product.product_id)
    )
    assert isinstance(refused, NotFound) and refused.reason == "PRODUCT_NOT_FOUND"
    listed = await servicer.ListProducts(api.ListProductsRequest(merchant_id="umbrella"), None)
    assert list(listed.products) == []


async def test_prices_follow_one_another_and_offers_follow_the_clock(
    servicer: CatalogServicer, directory: MerchantDirectory, acme: str, clock: Clock
) -> None:
    clock.now = T0 + timedelta(days=10)
    product = await _create_product(servicer, acme, "product-prices")

    def schedule(
        request_id: str, amount: int, currency: str = "EUR", at: datetime | None = None
    ) -> api.ScheduleProductPriceRequest:
        request = api.ScheduleProductPriceRequest(
            merchant_id=acme,
            product_id=product.product_id,
            request_id=request_id,
            price=Money(amount_minor=amount, currency=currency),
        )
        if at is not None:
            request.effective_time.CopyFrom(protobuf.timestamp(at))
        return request

    first = await servicer.ScheduleProductPrice(schedule("price-1", 990), None)
    assert first.price.effective_time.ToDatetime(tzinfo=UTC) == clock.now and not first.HasField(
        "previous_price"
    )
    later = clock.now + timedelta(days=30)
    second = await servicer.ScheduleProductPrice(schedule("price-2", 1090, at=later), None)
    assert second.previous_price.archive_time == second.price.effective_time
    assert second.previous_price.price_id == first.price.price_id

    overlap = await _refusal(servicer.ScheduleProductPrice, schedule("price-3", 1000, at=later))
    assert isinstance(overlap, FailedPrecondition) and overlap.reason == "PRICE_VERSION_OVERLAP"
    past = await _refusal(
        servicer.ScheduleProductPrice, schedule("price-4", 1000, at=clock.now - timedelta(seconds=1))
    )
    assert isinstance(past, InvalidArgument) and [v.field for v in past.violations] == ["effective_time"]

    offer = api.GetOfferRequest(merchant_id=acme, product_id=product.product_id)
    assert (await servicer.GetOffer(offer, None)).offer.price.amount.amount_minor == 990
    clock.now = later
    assert (await servicer.GetOffer(offer, None)).offer.price.amount.amount_minor == 1090
    offers = await servicer.ListOffers(api.ListOffersRequest(merchant_id=acme, page_size=500), None)
    assert product.product_id in [o.product.product_id for o in offers.offers]

    no_usd = await _refusal(
        servicer.GetOffer,
        api.GetOfferRequest(merchant_id=acme, product_id=product.product_id, currency="USD"),
    )
    assert isinstance(no_usd, NotFound) and no_usd.reason == "PRICE_NOT_FOUND"
    listed = await servicer.ListProductPrices(
        api.ListProductPricesRequest(merchant_id=acme, product_id=product.product_id, page_size=1), None
    )
    assert [p.price_id for p in listed.prices] == [first.price.price_id] and listed.next_page_token
    announced = await _events(directory, acme, events.PRODUCT_PRICE_SCHEDULED)
    assert [(e.price, e.previous_price) for e in announced[-2:]] == [
        (first.price, res.ProductPrice()),
        (second.price, second.previous_price),
    ]

    await servicer.ArchiveProduct(
        api.ArchiveProductRequest(
            merchant_id=acme, product_id=product.product_id, request_id="archive-priced"
        ),
        None,
    )
    gone = await _refusal(servicer.GetOffer, offer)
    assert isinstance(gone, FailedPrecondition) and gone.reason == "PRODUCT_ARCHIVED"
    repriced = await _refusal(servicer.ScheduleProductPrice, schedule("price-5", 1000))
    assert isinstance(repriced, FailedPrecondition) and repriced.reason == "PRODUCT_ARCHIVED"


async def test_grants_are_never_priced_or_offered(servicer: CatalogServicer, acme: str) -> None:
    grant = await _create_product(
        servicer,
        acme,
        "product-grant",
        distribution=res.PRODUCT_DISTRIBUTION_GRANT,
        grant_policy=res.GRANT_POLICY_APPLY_ON_SIGNUP,
    )
    refused = await _refusal(
        servicer.ScheduleProductPrice,
        api.ScheduleProductPriceRequest(
            merchant_id=acme,
            product_id=grant.product_id,
            request_id="price-grant",
            price=Money(amount_minor=1, currency="EUR"),
        ),
    )
    assert isinstance(refused, FailedPrecondition) and refused.reason == "PRODUCT_NOT_SELLABLE"
    signup = await servicer.ListProducts(
        api.ListProductsRequest(merchant_id=acme, grant_policy=res.GRANT_POLICY_APPLY_ON_SIGNUP), None
    )
    assert [p.product_id for p in signup.products] == [grant.product_id]


# --- operation types --------------------------------------------------------------------------


async def test_operation_type_versions_succeed_one_another(
    servicer: CatalogServicer, directory: MerchantDirectory, acme: str, clock: Clock
) -> None:
    clock.now = T0 + timedelta(days=100)
    start = clock.now

    def schedule(
        request_id: str, rate: str, at: datetime | None = None
    ) -> api.ScheduleOperationTypeVersionRequest:
        request = api.ScheduleOperationTypeVersionRequest(
            merchant_id=acme,
            operation_code="llm.tokens",
            request_id=request_id,
            resource_unit="token",
            credits_per_unit=Credits(value=rate),
        )
        if at is not None:
            request.effective_time.CopyFrom(protobuf.timestamp(at))
        return request

    unknown = await _refusal(
        servicer.GetActiveOperationTypeVersion,
        api.GetActiveOperationTypeVersionRequest(merchant_id=acme, operation_code="llm.tokens"),
    )
    assert isinstance(unknown, NotFound) and unknown.reason == "OPERATION_TYPE_NOT_FOUND"

    first = (
        await servicer.ScheduleOperationTypeVersion(schedule("op-1", "0.001"), None)
    ).operation_type_version
    switch = start + timedelta(days=7)
    second = await servicer.ScheduleOperationTypeVersion(schedule("op-2", "0.002", at=switch), None)
    assert second.operation_type_version.version == 2
    assert second.previous_version.end_time == second.operation_type_version.effective_time

    overlap = await _refusal(servicer.ScheduleOperationTypeVersion, schedule("op-3", "0.003", at=switch))
    assert isinstance(overlap, FailedPrecondition) and overlap.reason == "OPERATION_TYPE_VERSION_OVERLAP"

    async def active_at(instant: datetime) -> int:
        request = api.GetActiveOperationTypeVersionRequest(merchant_id=acme, operation_code="llm.tokens")
        request.read_time.CopyFrom(protobuf.timestamp(instant))
        return (await servicer.GetActiveOperationTypeVersion(request, None)).operation_type_version.version

    assert await active_at(start) == 1
    assert await active_at(switch - timedelta(microseconds=1)) == 1
    assert await active_at(switch) == 2
    before = api.GetActiveOperationTypeVersionRequest(merchant_id=acme, operation_code="llm.tokens")
    before.read_time.CopyFrom(protobuf.timestamp(start - timedelta(seconds=1)))
    not_yet = await _refusal(servicer.GetActiveOperationTypeVersion, before)
    assert isinstance(not_yet, NotFound) and not_yet.reason == "OPERATION_TYPE_NOT_ACTIVE"

    fetched = await servicer.GetOperationTypeVersion(
        api.GetOperationTypeVersionRequest(merchant_id=acme, operation_code="llm.tokens", version=1), None
    )
    assert fetched.operation_type_version == second.previous_version
    assert fetched.operation_type_version.credits_per_unit.value == first.credits_per_unit.value == "0.001"
    listed = await servicer.ListOperationTypeVersions(
        api.ListOperationTypeVersionsRequest(merchant_id=acme, operation_code="-"), None
    )
    assert [(v.operation_code, v.version) for v in listed.operation_type_versions] == [
        ("llm.tokens", 1),
        ("llm.tokens", 2),
    ]
    announced = await _events(directory, acme, events.OPERATION_TYPE_VERSION_SCHEDULED)
    assert [e.operation_type_version.version for e in announced] == [1, 2]


# --- subscription plans -----------------------------------------------------------------------


async def test_plans_need_an_active_manual_grant(
    servicer: CatalogServicer, directory: MerchantDirectory, acme: str
) -> None:
    grant = await _create_product(
        servicer,
        acme,
        "product-plan-grant",
        distribution=res.PRODUCT_DISTRIBUTION_GRANT,
        grant_policy=res.GRANT_POLICY_MANUAL_GRANT,
    )
    sellable = await _create_product(servicer, acme, "product-plan-sellable")

    def create(request_id: str, product_id: str) -> api.CreateSubscriptionPlanRequest:
        return api.CreateSubscriptionPlanRequest(
            merchant_id=acme,
            request_id=request_id,
            subscription_plan=res.SubscriptionPlan(
                name="Pro",
                price=Money(amount_minor=1999, currency="EUR"),
                billing_interval=res.BillingInterval(unit=res.BILLING_INTERVAL_UNIT_MONTH, count=1),
                recurring_grant_product_id=product_id,
                dunning=res.DunningPolicy(final_action=res.DUNNING_FINAL_ACTION_CANCEL),
            ),
        )

    plan = (await servicer.CreateSubscriptionPlan(create("plan-1", grant.product_id), None)).subscription_plan
    assert [d.ToTimedelta() for d in plan.dunning.retry_delays] == [
        timedelta(hours=1),
        timedelta(hours=24),
        timedelta(hours=72),
    ]
    fetched = await servicer.GetSubscriptionPlan(
        api.GetSubscriptionPlanRequest(merchant_id=acme, plan_id=plan.plan_id), None
    )
    assert fetched.subscription_plan == plan
    listed = await servicer.ListSubscriptionPlans(api.ListSubscriptionPlansRequest(merchant_id=acme), None)
    assert plan in listed.subscription_plans
    assert [
        e.subscription_plan for e in await _events(directory, acme, events.SUBSCRIPTION_PLAN_CREATED)
    ] == [plan]

    not_grant = await _refusal(servicer.CreateSubscriptionPlan, create("plan-2", sellable.product_id))
    assert isinstance(not_grant, FailedPrecondition) and not_grant.reason == "PRODUCT_NOT_MANUAL_GRANT"
    missing = await _refusal(
        servicer.CreateSubscriptionPlan, create("plan-3", "0b6f3c1e-8f0a-4c5e-9a51-2f4f1c9e7d10")
    )
    assert isinstance(missing, NotFound) and missing.reason == "PRODUCT_NOT_FOUND"
