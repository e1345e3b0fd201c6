"""The catalog store against the real PostgreSQL: round trips, keyset pages, and the rules the
database enforces on its own (checks, exclusion constraints, immutability triggers), proven
by writing around the domain."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid4

import asyncpg
import pytest
from tally_catalog import domain, store
from tally_catalog.domain import (
    BillingInterval,
    Distribution,
    DunningPolicy,
    FinalAction,
    GrantPolicy,
    IntervalUnit,
    Merchant,
    MerchantConfig,
    Money,
    OperationTypeVersion,
    PostalAddress,
    Product,
    ProductPrice,
    SubscriptionPlan,
    TaxRegime,
)
from tally_catalog.settings import CatalogSettings
from tally_kit import amounts
from tally_kit.errors import AlreadyExists, FailedPrecondition, NotFound, Violations
from tally_kit.pagination import PageRequest, read_page_request

from .conftest import create_catalog_database

pytestmark = pytest.mark.integration

MERCHANT = "acme"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _merchant() -> Merchant:
    config = MerchantConfig(
        legal_name="Acme SAS",
        tax_id="FR40303265045",
        address=PostalAddress(("1 rue de la Paix", "Bâtiment B"), "Paris", "Île-de-France", "75002", "FR"),
        receipt_series_prefix="ACME-2030",
        tax_regime=TaxRegime(Decimal("8.875"), False),
        operation_timeout=timedelta(minutes=15),
        retention_days=3650,
        default_currency="EUR",
    )
    return Merchant(MERCHANT, config, 1, T0, T0)


def _product(**changes: object) -> Product:
    product = Product(
        product_id=uuid4(),
        merchant_id=MERCHANT,
        name="Starter pack",
        credits=Decimal("100.000001"),
        access_period_days=30,
        distribution=Distribution.SELLABLE,
        grant_policy=None,
        created_at=T0,
        archived_at=None,
    )
    return dataclasses.replace(product, **changes)


def _grant(**changes: object) -> Product:
    return _product(
        **{"distribution": Distribution.GRANT, "grant_policy": GrantPolicy.MANUAL_GRANT, **changes}
    )


def _page(
    size: int, token: str = "", scope: str = "test", key: tuple[type, ...] = (datetime, UUID)
) -> PageRequest:
    violations = Violations()
    page = read_page_request(violations, page_size=size, page_token=token, scope={"list": scope}, key=key)
    violations.raise_if_any()
    return page


async def _with_merchant(conn: asyncpg.Connection) -> Merchant:
    merchant = _merchant()
    await store.insert_merchant(conn, merchant)
    return merchant


async def _refused(conn: asyncpg.Connection, error: type[Exception], sql: str, *args: object) -> None:
    """The statement fails with `error`; a savepoint keeps the test's transaction usable."""
    with pytest.raises(error):
        async with conn.transaction():
            await conn.execute(sql, *args)


# --- merchants --------------------------------------------------------------------------------


async def test_a_merchant_round_trips_exactly(conn: asyncpg.Connection) -> None:
    merchant = await _with_merchant(conn)
    assert await store.get_merchant(conn, MERCHANT) == merchant


async def test_a_merchant_is_created_once(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    with pytest.raises(AlreadyExists) as refused:
        await store.insert_merchant(conn, _merchant())
    assert refused.value.reason == "MERCHANT_ALREADY_EXISTS"


async def test_a_database_holds_one_merchant(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    with pytest.raises(AlreadyExists):
        await store.insert_merchant(conn, dataclasses.replace(_merchant(), merchant_id="other"))


async def test_an_unknown_merchant_is_not_found(conn: asyncpg.Connection) -> None:
    with pytest.raises(NotFound) as missing:
        await store.get_merchant(conn, MERCHANT)
    assert missing.value.reason == "MERCHANT_NOT_FOUND"


async def test_a_config_change_is_saved_with_its_revision(conn: asyncpg.Connection) -> None:
    merchant = await _with_merchant(conn)
    address = PostalAddress(("2 avenue Foch",), "Lyon", "", "", "FR")
    changed = domain.reconfigure(
        merchant,
        {"address": address, "tax_regime": TaxRegime(Decimal(20), True), "default_currency": "USD"},
        T0 + timedelta(days=1),
    )
    await store.save_merchant_config(conn, changed)
    assert await store.get_merchant(conn, MERCHANT, lock=True) == changed
    assert changed.config_revision == 2


# --- products ---------------------------------------------------------------------------------


async def test_products_round_trip_with_exact_credits(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    for product in (
        _product(credits=Decimal("0.000001")),
        _product(credits=amounts.MAX_CREDITS, access_period_days=None),
        _grant(),
    ):
        await store.insert_product(conn, product)
        assert await store.get_product(conn, MERCHANT, product.product_id) == product


async def test_an_unknown_product_is_not_found(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    assert await store.find_product(conn, MERCHANT, uuid4()) is None
    with pytest.raises(NotFound) as missing:
        await store.get_product(conn, MERCHANT, uuid4())
    assert missing.value.reason == "PRODUCT_NOT_FOUND"


async def test_a_product_belongs_to_the_merchant_of_its_database(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    product = _product()
    await store.insert_product(conn, product)
    assert await store.find_product(conn, "other", product.product_id) is None
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        async with conn.transaction():
            await store.insert_product(conn, _product(merchant_id="other"))


async def test_products_are_immutable_except_for_archiving_once(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    product = _product()
    await store.insert_product(conn, product)
    update = "UPDATE products SET {} WHERE product_id = $1"
    for assignment in ("name = 'Renamed'", "credits = 1", "access_period_days = NULL", "created_at = now()"):
        await _refused(conn, asyncpg.RestrictViolationError, update.format(assignment), product.product_id)
    await _refused(
        conn, asyncpg.RestrictViolationError, "DELETE FROM products WHERE product_id = $1", product.product_id
    )

    archived = domain.archive(product, T0 + timedelta(days=1))
    await store.save_archive(conn, archived)
    assert await store.get_product(conn, MERCHANT, product.product_id) == archived
    await _refused(
        conn, asyncpg.RestrictViolationError, update.format("archived_at = NULL"), product.product_id
    )
    await _refused(
        conn, asyncpg.RestrictViolationError, update.format("archived_at = now()"), product.product_id
    )


@pytest.mark.parametrize(
    ("distribution", "grant_policy"),
    [("sellable", "manual_grant"), ("grant", None)],
)
async def test_the_database_ties_grant_policies_to_grants(
    conn: asyncpg.Connection, distribution: str, grant_policy: str | None
) -> None:
    await _with_merchant(conn)
    await _refused(
        conn,
        asyncpg.CheckViolationError,
        """
        INSERT INTO products (merchant_id, product_id, name, credits, distribution, grant_policy, created_at)
        VALUES ($1, $2, 'x', 1, $3, $4, now())
        """,
        MERCHANT,
        uuid4(),
        distribution,
        grant_policy,
    )


@pytest.mark.parametrize("credits", ["0", "-1", "0.0000001"])
async def test_the_database_keeps_credits_positive_with_six_decimals(
    conn: asyncpg.Connection, credits: str
) -> None:
    await _with_merchant(conn)
    product_id = uuid4()
    try:
        async with conn.transaction():
            await conn.execute(
                """
                INSERT INTO products (merchant_id, product_id, name, credits, distribution, created_at)
                VALUES ($1, $2, 'x', $3::numeric, 'sellable', now())
                """,
                MERCHANT,
                product_id,
                credits,
            )
    except asyncpg.CheckViolationError:
        return
    # numeric(20, 6) rounds what it does not refuse: 0.0000001 becomes 0, which the check refuses.
    pytest.fail(
        f"stored {await conn.fetchval('SELECT credits FROM products WHERE product_id = $1', product_id)}"
    )


async def test_products_are_listed_in_keyset_pages_with_their_filters(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    products = [_product(created_at=T0 + timedelta(minutes=i)) for i in range(5)]
    products += [
        _grant(created_at=T0 + timedelta(minutes=10)),
        _product(created_at=T0 + timedelta(minutes=11)),
    ]
    products[1] = dataclasses.replace(products[1], archived_at=T0 + timedelta(hours=1))
    for product in products:
        await store.insert_product(conn, product)

    async def every_page(**filters: object) -> list[Product]:
        seen: list[Product] = []
        token = ""
        while True:
            page = await store.list_products(conn, MERCHANT, _page(2, token), **filters)  # type: ignore[arg-type]
            assert len(page.items) <= 2
            seen += page.items
            token = page.next_page_token
            if not token:
                return seen

    active = [p for p in products if not p.archived]
    assert await every_page(distribution=None, grant_policy=None, show_archived=False) == active
    assert await every_page(distribution=None, grant_policy=None, show_archived=True) == products
    assert await every_page(distribution=Distribution.GRANT, grant_policy=None, show_archived=True) == [
        products[5]
    ]
    assert (
        await every_page(distribution=None, grant_policy=GrantPolicy.APPLY_ON_SIGNUP, show_archived=True)
        == []
    )


# --- prices -----------------------------------------------------------------------------------


async def _schedule(
    conn: asyncpg.Connection, product: Product, amount: Money, start: datetime, now: datetime = T0
) -> domain.PriceChange:
    existing = await store.price_versions(conn, MERCHANT, product.product_id, amount.currency)
    change = domain.schedule_price(
        existing, price_id=uuid4(), product=product, amount=amount, effective_at=start, now=now
    )
    await store.save_price_change(conn, change)
    return change


async def test_a_new_price_archives_the_previous_one_where_it_starts(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    product = _product()
    await store.insert_product(conn, product)
    first = await _schedule(conn, product, Money(990, "EUR"), T0)
    second = await _schedule(conn, product, Money(1090, "EUR"), T0 + timedelta(days=30))
    await _schedule(conn, product, Money(1200, "USD"), T0)

    assert second.superseded == dataclasses.replace(first.price, archived_at=T0 + timedelta(days=30))
    assert await store.price_versions(conn, MERCHANT, product.product_id, "EUR") == [
        second.superseded,
        second.price,
    ]


async def test_the_database_refuses_overlapping_prices_even_around_the_domain(
    conn: asyncpg.Connection,
) -> None:
    await _with_merchant(conn)
    product = _product()
    await store.insert_product(conn, product)
    current = (await _schedule(conn, product, Money(990, "EUR"), T0)).price
    insert = """
        INSERT INTO product_prices
            (merchant_id, price_id, product_id, currency, amount_minor, effective_at, archived_at, created_at)
        VALUES ($1, $2, $3, $4, 500, $5, $6, now())
    """
    # An open-ended second version, a closed one inside the open one: both overlap it.
    for effective_at, archived_at in (
        (T0 + timedelta(days=1), None),
        (T0 + timedelta(days=1), T0 + timedelta(days=2)),
    ):
        await _refused(
            conn,
            asyncpg.ExclusionViolationError,
            insert,
            MERCHANT,
            uuid4(),
            product.product_id,
            "EUR",
            effective_at,
            archived_at,
        )
    # Another currency is another timeline.
    await conn.execute(insert, MERCHANT, uuid4(), product.product_id, "USD", T0, None)

    # A forged change that skips the domain's check is refused the same way.
    forged = domain.PriceChange(
        price=dataclasses.replace(current, price_id=uuid4(), effective_at=T0 + timedelta(hours=1)),
        superseded=None,
    )
    with pytest.raises(FailedPrecondition) as refused:
        async with conn.transaction():
            await store.save_price_change(conn, forged)
    assert refused.value.reason == "PRICE_VERSION_OVERLAP"


async def test_price_versions_are_immutable_except_for_archiving_once(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    product = _product()
    await store.insert_product(conn, product)
    price = (await _schedule(conn, product, Money(990, "EUR"), T0)).price
    for assignment in (
        "amount_minor = 1",
        "effective_at = effective_at - interval '1 day'",
        "currency = 'USD'",
    ):
        await _refused(
            conn,
            asyncpg.RestrictViolationError,
            f"UPDATE product_prices SET {assignment} WHERE price_id = $1",
            price.price_id,
        )
    await _refused(
        conn, asyncpg.RestrictViolationError, "DELETE FROM product_prices WHERE price_id = $1", price.price_id
    )


async def test_the_database_prices_only_active_sellable_products(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    grant = _grant()
    archived = _product(archived_at=T0)
    for product in (grant, archived):
        await store.insert_product(conn, product)
        await _refused(
            conn,
            asyncpg.CheckViolationError,
            """
            INSERT INTO product_prices
                (merchant_id, price_id, product_id, currency, amount_minor, effective_at, created_at)
            VALUES ($1, $2, $3, 'EUR', 100, now(), now())
            """,
            MERCHANT,
            uuid4(),
            product.product_id,
        )


async def test_prices_are_listed_by_currency_then_time(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    product = _product()
    await store.insert_product(conn, product)
    for currency in ("USD", "EUR"):
        for day in range(3):
            await _schedule(conn, product, Money(100 + day, currency), T0 + timedelta(days=day))
    expected = sorted(
        [
            *await store.price_versions(conn, MERCHANT, product.product_id, "EUR"),
            *await store.price_versions(conn, MERCHANT, product.product_id, "USD"),
        ],
        key=lambda p: (p.amount.currency, p.effective_at),
    )
    seen: list[ProductPrice] = []
    token = ""
    while True:
        page = await store.list_prices(
            conn, MERCHANT, product.product_id, _page(4, token, key=(str, datetime, UUID)), currency=None
        )
        seen += page.items
        token = page.next_page_token
        if not token:
            break
    assert seen == expected
    only_usd = await store.list_prices(
        conn, MERCHANT, product.product_id, _page(10, key=(str, datetime, UUID)), currency="USD"
    )
    assert [p.amount.currency for p in only_usd.items] == ["USD"] * 3


async def test_offers_are_active_sellable_products_with_a_price_in_effect(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    now = T0 + timedelta(days=1)
    offered = _product(created_at=T0)
    later_price = _product(created_at=T0 + timedelta(seconds=1))
    other_currency = _product(created_at=T0 + timedelta(seconds=2))
    archived = _product(created_at=T0 + timedelta(seconds=3))
    for product in (offered, later_price, other_currency, archived):
        await store.insert_product(conn, product)
    first = await _schedule(conn, offered, Money(990, "EUR"), T0)
    current = await _schedule(conn, offered, Money(890, "EUR"), now, now=now)
    await _schedule(conn, later_price, Money(990, "EUR"), now + timedelta(seconds=1), now=now)
    await _schedule(conn, other_currency, Money(990, "USD"), T0)
    await _schedule(conn, archived, Money(990, "EUR"), T0)
    await store.save_archive(conn, domain.archive(archived, now))

    page = await store.list_offers(conn, MERCHANT, _page(10), currency="EUR", at=now)
    assert [(o.product, o.price) for o in page.items] == [(offered, current.price)]
    before = await store.list_offers(
        conn, MERCHANT, _page(10), currency="EUR", at=now - timedelta(microseconds=1)
    )
    # Archiving is a state, not a period: an archived product is never offered again.
    assert [o.price for o in before.items] == [dataclasses.replace(first.price, archived_at=now)]
    assert (await store.list_offers(conn, MERCHANT, _page(10), currency="GBP", at=now)).items == []


async def test_offers_come_in_keyset_pages(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    products = [_product(created_at=T0 + timedelta(seconds=i)) for i in range(5)]
    for product in products:
        await store.insert_product(conn, product)
        await _schedule(conn, product, Money(100, "EUR"), T0)
    first = await store.list_offers(conn, MERCHANT, _page(3), currency="EUR", at=T0)
    second = await store.list_offers(conn, MERCHANT, _page(3, first.next_page_token), currency="EUR", at=T0)
    assert [o.product for o in first.items + second.items] == products
    assert second.next_page_token == ""


# --- operation types --------------------------------------------------------------------------


async def _schedule_version(
    conn: asyncpg.Connection, code: str, start: datetime, now: datetime = T0, rate: str = "0.5"
) -> domain.OperationTypeChange:
    await store.lock_operation_code(conn, MERCHANT, code)
    existing = await store.operation_type_versions(conn, MERCHANT, code)
    change = domain.schedule_operation_type_version(
        existing,
        merchant_id=MERCHANT,
        operation_code=code,
        resource_unit="token",
        credits_per_unit=Decimal(rate),
        effective_at=start,
        now=now,
    )
    await store.save_operation_type_change(conn, change)
    return change


async def test_operation_type_versions_chain_and_round_trip(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    first = await _schedule_version(conn, "llm.tokens", T0, rate="0.000001")
    second = await _schedule_version(conn, "llm.tokens", T0 + timedelta(days=7), rate="99999999999999.999999")
    assert await store.operation_type_versions(conn, MERCHANT, "llm.tokens") == [
        second.previous,
        second.version,
    ]
    assert second.previous == dataclasses.replace(first.version, ends_at=T0 + timedelta(days=7))
    assert await store.get_operation_type_version(conn, MERCHANT, "llm.tokens", 2) == second.version
    with pytest.raises(NotFound) as missing:
        await store.get_operation_type_version(conn, MERCHANT, "llm.tokens", 3)
    assert missing.value.reason == "OPERATION_TYPE_VERSION_NOT_FOUND"


async def test_the_database_refuses_overlapping_or_gapped_versions_even_around_the_domain(
    conn: asyncpg.Connection,
) -> None:
    await _with_merchant(conn)
    first = (await _schedule_version(conn, "llm.tokens", T0)).version
    insert = """
        INSERT INTO operation_type_versions
            (merchant_id, operation_code, version, resource_unit, credits_per_unit, effective_at, ends_at,
             created_at)
        VALUES ($1, 'llm.tokens', $2, 'token', 1, $3, $4, now())
    """
    overlapping = (MERCHANT, 2, T0 + timedelta(days=1), T0 + timedelta(days=2))
    # Overlap: the open-ended first version still covers the second's period. The chain
    # trigger refuses it first...
    await _refused(conn, asyncpg.CheckViolationError, insert, *overlapping)
    # ...and without any trigger the exclusion constraint still does.
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await _refused(conn, asyncpg.ExclusionViolationError, insert, *overlapping)
        await conn.execute("SET LOCAL session_replication_role = origin")
    # Two schedulers racing for the same version without the code's lock: the loser is
    # refused as an overlap.
    forged = domain.OperationTypeChange(
        version=dataclasses.replace(first, effective_at=T0 + timedelta(hours=1)), previous=None
    )
    with pytest.raises(FailedPrecondition) as refused:
        async with conn.transaction():
            await store.save_operation_type_change(conn, forged)
    assert refused.value.reason == "OPERATION_TYPE_VERSION_OVERLAP"
    # Gap: the first version ends on day 1 but the second starts on day 2.
    await conn.execute(
        "UPDATE operation_type_versions SET ends_at = $1 WHERE operation_code = 'llm.tokens' AND version = 1",
        T0 + timedelta(days=1),
    )
    await _refused(conn, asyncpg.CheckViolationError, insert, MERCHANT, 2, T0 + timedelta(days=2), None)
    # Ending a version is done once.
    await _refused(
        conn,
        asyncpg.RestrictViolationError,
        "UPDATE operation_type_versions SET ends_at = NULL WHERE version = 1",
    )


async def test_versions_are_listed_by_code_then_number(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    for code in ("b.calls", "a.seconds"):
        for day in range(3):
            await _schedule_version(conn, code, T0 + timedelta(days=day))
    key = (str, int)
    seen: list[OperationTypeVersion] = []
    token = ""
    while True:
        page = await store.list_operation_type_versions(
            conn, MERCHANT, _page(4, token, key=key), operation_code=None
        )
        seen += page.items
        token = page.next_page_token
        if not token:
            break
    assert [(v.operation_code, v.version) for v in seen] == [
        (code, number) for code in ("a.seconds", "b.calls") for number in (1, 2, 3)
    ]
    one_code = await store.list_operation_type_versions(
        conn, MERCHANT, _page(10, key=key), operation_code="b.calls"
    )
    assert [v.version for v in one_code.items] == [1, 2, 3]


async def test_concurrent_schedulings_of_one_code_are_serialised(store_settings: CatalogSettings) -> None:
    """Two transactions read the same versions at once; the lock makes the second see the first's."""
    connect = await create_catalog_database(store_settings, "store_concurrency")
    setup = await connect()
    try:
        await store.insert_merchant(setup, _merchant())
    finally:
        await setup.close()
    first, second = await connect(), await connect()
    try:

        async def schedule(conn: asyncpg.Connection, start: datetime) -> domain.OperationTypeChange:
            async with conn.transaction():
                change = await _schedule_version(conn, "llm.tokens", start)
                # Hold the lock a while, so the other transaction really waits for it.
                await asyncio.sleep(0.2)
                return change

        results = await asyncio.gather(
            schedule(first, T0 + timedelta(days=1)),
            schedule(second, T0 + timedelta(days=2)),
            return_exceptions=True,
        )
        verifier = first
        versions = await store.operation_type_versions(verifier, MERCHANT, "llm.tokens")
        successes = [r for r in results if isinstance(r, domain.OperationTypeChange)]
        failures = [r for r in results if not isinstance(r, domain.OperationTypeChange)]
        # Whichever went first, the day-2 version follows the day-1 one or the day-1 one is refused.
        assert len(successes) + len(failures) == 2
        assert all(isinstance(f, FailedPrecondition) for f in failures)
        assert [v.version for v in versions] == list(range(1, len(successes) + 1))
        for earlier, later in itertools.pairwise(versions):
            assert earlier.ends_at == later.effective_at
    finally:
        await first.close()
        await second.close()


# --- subscription plans -----------------------------------------------------------------------


def _plan(grant: Product, **changes: object) -> SubscriptionPlan:
    plan = SubscriptionPlan(
        plan_id=uuid4(),
        merchant_id=MERCHANT,
        name="Pro monthly",
        price=Money(1999, "EUR"),
        billing_interval=BillingInterval(IntervalUnit.MONTH, 1),
        trial_days=14,
        recurring_grant_product_id=grant.product_id,
        dunning=DunningPolicy(domain.DEFAULT_DUNNING_RETRY_DELAYS, FinalAction.CANCEL),
        created_at=T0,
    )
    return dataclasses.replace(plan, **changes)


async def test_plans_round_trip_and_come_in_pages(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    grant = _grant()
    await store.insert_product(conn, grant)
    plans = [_plan(grant, created_at=T0 + timedelta(seconds=i)) for i in range(3)]
    plans[1] = dataclasses.replace(
        plans[1],
        dunning=DunningPolicy((timedelta(minutes=5),), FinalAction.SUSPEND),
        billing_interval=BillingInterval(IntervalUnit.YEAR, 5),
    )
    for plan in plans:
        await store.insert_plan(conn, plan)
    assert await store.get_plan(conn, MERCHANT, plans[1].plan_id) == plans[1]
    first = await store.list_plans(conn, MERCHANT, _page(2))
    second = await store.list_plans(conn, MERCHANT, _page(2, first.next_page_token))
    assert first.items + second.items == plans and second.next_page_token == ""
    with pytest.raises(NotFound) as missing:
        await store.get_plan(conn, MERCHANT, uuid4())
    assert missing.value.reason == "SUBSCRIPTION_PLAN_NOT_FOUND"


async def test_the_database_refuses_plans_the_domain_forbids(conn: asyncpg.Connection) -> None:
    await _with_merchant(conn)
    grant, signup, sellable = _grant(), _grant(grant_policy=GrantPolicy.APPLY_ON_SIGNUP), _product()
    for product in (grant, signup, sellable):
        await store.insert_product(conn, product)
    for plan in (_plan(signup), _plan(sellable)):
        with pytest.raises(asyncpg.CheckViolationError):
            async with conn.transaction():
                await store.insert_plan(conn, plan)
    for delays in (
        (timedelta(hours=2), timedelta(hours=1)),
        (timedelta(hours=1), timedelta(hours=1)),
        (timedelta(0),),
    ):
        with pytest.raises(asyncpg.CheckViolationError):
            async with conn.transaction():
                await store.insert_plan(conn, _plan(grant, dunning=DunningPolicy(delays, FinalAction.CANCEL)))
    with pytest.raises(asyncpg.CheckViolationError):
        async with conn.transaction():
            await store.insert_plan(
                conn, _plan(grant, billing_interval=BillingInterval(IntervalUnit.MONTH, 61))
            )
    plan = _plan(grant)
    await store.insert_plan(conn, plan)
    await _refused(
        conn,
        asyncpg.RestrictViolationError,
        "UPDATE subscription_plans SET trial_days = 0 WHERE plan_id = $1",
        plan.plan_id,
    )
