"""The catalog's SQL: async functions over one merchant database's connection.

The caller owns the transaction. Every query filters on `merchant_id`, even though each
merchant has a database of its own. Functions return domain objects; constraint
violations the domain should already have prevented surface as the same refusals.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from uuid import UUID

import asyncpg
from tally_kit.db.migrations import MigrationSource
from tally_kit.errors import AlreadyExists, FailedPrecondition, NotFound
from tally_kit.pagination import Page, PageRequest, page_of

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
    Offer,
    OperationTypeChange,
    OperationTypeVersion,
    PostalAddress,
    PriceChange,
    Product,
    ProductPrice,
    SubscriptionPlan,
    TaxRegime,
)

# Applied to every merchant database after the kit's own migrations.
MIGRATIONS = MigrationSource("catalog", Path(__file__).resolve().parent / "migrations")

# --- merchants ----------------------------------------------------------------------------

_MERCHANT_COLUMNS = """
    merchant_id, legal_name, tax_id, address_lines, locality, administrative_area, postal_code,
    region_code, receipt_series_prefix, tax_rate_percent, prices_include_tax,
    operation_timeout_seconds, retention_days, default_currency, config_revision, created_at,
    updated_at
"""


def _merchant(row: asyncpg.Record) -> Merchant:
    return Merchant(
        merchant_id=row["merchant_id"],
        config=MerchantConfig(
            legal_name=row["legal_name"],
            tax_id=row["tax_id"],
            address=PostalAddress(
                address_lines=tuple(row["address_lines"]),
                locality=row["locality"],
                administrative_area=row["administrative_area"],
                postal_code=row["postal_code"],
                region_code=row["region_code"],
            ),
            receipt_series_prefix=row["receipt_series_prefix"],
            tax_regime=TaxRegime(
                rate_percent=row["tax_rate_percent"], prices_include_tax=row["prices_include_tax"]
            ),
            operation_timeout=timedelta(seconds=row["operation_timeout_seconds"]),
            retention_days=row["retention_days"],
            default_currency=row["default_currency"],
        ),
        config_revision=row["config_revision"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _config_values(config: MerchantConfig) -> tuple[object, ...]:
    return (
        config.legal_name,
        config.tax_id,
        list(config.address.address_lines),
        config.address.locality,
        config.address.administrative_area,
        config.address.postal_code,
        config.address.region_code,
        config.receipt_series_prefix,
        config.tax_regime.rate_percent,
        config.tax_regime.prices_include_tax,
        int(config.operation_timeout.total_seconds()),
        config.retention_days,
        config.default_currency,
    )


async def insert_merchant(conn: asyncpg.Connection, merchant: Merchant) -> None:
    inserted = await conn.fetchval(
        f"""
        INSERT INTO merchant ({_MERCHANT_COLUMNS})
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        merchant.merchant_id,
        *_config_values(merchant.config),
        merchant.config_revision,
        merchant.created_at,
        merchant.updated_at,
    )
    if not inserted:
        raise AlreadyExists(
            f"merchant {merchant.merchant_id} already exists", reason="MERCHANT_ALREADY_EXISTS"
        )


async def get_merchant(conn: asyncpg.Connection, merchant_id: str, *, lock: bool = False) -> Merchant:
    """The merchant; `lock` holds its row until the transaction ends (for a config change)."""
    row = await conn.fetchrow(
        f"SELECT {_MERCHANT_COLUMNS} FROM merchant WHERE merchant_id = $1{' FOR UPDATE' if lock else ''}",
        merchant_id,
    )
    if row is None:
        raise NotFound(f"merchant {merchant_id} does not exist", reason="MERCHANT_NOT_FOUND")
    return _merchant(row)


async def save_merchant_config(conn: asyncpg.Connection, merchant: Merchant) -> None:
    await conn.execute(
        """
        UPDATE merchant
           SET legal_name = $2, tax_id = $3, address_lines = $4, locality = $5,
               administrative_area = $6, postal_code = $7, region_code = $8,
               receipt_series_prefix = $9, tax_rate_percent = $10, prices_include_tax = $11,
               operation_timeout_seconds = $12, retention_days = $13, default_currency = $14,
               config_revision = $15, updated_at = $16
         WHERE merchant_id = $1
        """,
        merchant.merchant_id,
        *_config_values(merchant.config),
        merchant.config_revision,
        merchant.updated_at,
    )


# --- products -----------------------------------------------------------------------------

_PRODUCT_COLUMNS = """
    merchant_id, product_id, name, credits, access_period_days, distribution, grant_policy,
    created_at, archived_at
"""
# Read on every GetProduct: built once, so asyncpg's statement cache sees the same string.
_SELECT_PRODUCT = f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE merchant_id = $1 AND product_id = $2"
_SELECT_PRODUCT_FOR_UPDATE = f"{_SELECT_PRODUCT} FOR UPDATE"
_LIST_PRODUCTS = f"""
    SELECT {_PRODUCT_COLUMNS} FROM products
     WHERE merchant_id = $1
       AND ($2::text IS NULL OR distribution = $2)
       AND ($3::text IS NULL OR grant_policy = $3)
       AND ($4 OR archived_at IS NULL)
       AND ($5::timestamptz IS NULL OR (created_at, product_id) > ($5, $6::uuid))
     ORDER BY created_at, product_id
     LIMIT $7
"""
# Enum members by stored value: a dict lookup costs a fraction of calling the enum.
_DISTRIBUTIONS = {member.value: member for member in Distribution}
_GRANT_POLICIES = {member.value: member for member in GrantPolicy}


def _product(row: asyncpg.Record) -> Product:
    grant_policy = row["grant_policy"]
    return Product(
        product_id=row["product_id"],
        merchant_id=row["merchant_id"],
        name=row["name"],
        credits=row["credits"],
        access_period_days=row["access_period_days"],
        distribution=_DISTRIBUTIONS[row["distribution"]],
        grant_policy=_GRANT_POLICIES[grant_policy] if grant_policy is not None else None,
        created_at=row["created_at"],
        archived_at=row["archived_at"],
    )


async def insert_product(conn: asyncpg.Connection, product: Product) -> None:
    await conn.execute(
        f"INSERT INTO products ({_PRODUCT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        product.merchant_id,
        product.product_id,
        product.name,
        product.credits,
        product.access_period_days,
        product.distribution.value,
        product.grant_policy.value if product.grant_policy is not None else None,
        product.created_at,
        product.archived_at,
    )


async def find_product(
    conn: asyncpg.Connection, merchant_id: str, product_id: UUID, *, lock: bool = False
) -> Product | None:
    """The product or None; `lock` serialises what changes or depends on it (prices, archiving)."""
    row = await conn.fetchrow(
        _SELECT_PRODUCT_FOR_UPDATE if lock else _SELECT_PRODUCT, merchant_id, product_id
    )
    return _product(row) if row is not None else None


async def get_product(
    conn: asyncpg.Connection, merchant_id: str, product_id: UUID, *, lock: bool = False
) -> Product:
    product = await find_product(conn, merchant_id, product_id, lock=lock)
    if product is None:
        raise NotFound(f"product {product_id} does not exist", reason="PRODUCT_NOT_FOUND")
    return product


async def save_archive(conn: asyncpg.Connection, product: Product) -> None:
    await conn.execute(
        "UPDATE products SET archived_at = $3 WHERE merchant_id = $1 AND product_id = $2",
        product.merchant_id,
        product.product_id,
        product.archived_at,
    )


async def list_products(
    conn: asyncpg.Connection,
    merchant_id: str,
    page: PageRequest,
    *,
    distribution: Distribution | None,
    grant_policy: GrantPolicy | None,
    show_archived: bool,
) -> Page[Product]:
    after_time, after_id = page.after if page.after is not None else (None, None)
    rows = await conn.fetch(
        _LIST_PRODUCTS,
        merchant_id,
        distribution.value if distribution is not None else None,
        grant_policy.value if grant_policy is not None else None,
        show_archived,
        after_time,
        after_id,
        page.size + 1,
    )
    return page_of([_product(row) for row in rows], page, lambda p: (p.created_at, p.product_id))


# --- prices -------------------------------------------------------------------------------

_PRICE_COLUMNS = """
    merchant_id, price_id, product_id, currency, amount_minor, effective_at, archived_at, created_at
"""


def _price(row: asyncpg.Record, prefix: str = "") -> ProductPrice:
    return ProductPrice(
        price_id=row[f"{prefix}price_id"],
        merchant_id=row[f"{prefix}merchant_id"],
        product_id=row[f"{prefix}product_id"],
        amount=Money(amount_minor=row[f"{prefix}amount_minor"], currency=row[f"{prefix}currency"]),
        effective_at=row[f"{prefix}effective_at"],
        archived_at=row[f"{prefix}archived_at"],
        created_at=row[f"{prefix}created_at"],
    )


async def price_versions(
    conn: asyncpg.Connection, merchant_id: str, product_id: UUID, currency: str
) -> list[ProductPrice]:
    rows = await conn.fetch(
        f"""
        SELECT {_PRICE_COLUMNS} FROM product_prices
         WHERE merchant_id = $1 AND product_id = $2 AND currency = $3
         ORDER BY effective_at
        """,
        merchant_id,
        product_id,
        currency,
    )
    return [_price(row) for row in rows]


async def save_price_change(conn: asyncpg.Connection, change: PriceChange) -> None:
    """Archives the superseded version, then inserts the new one."""
    try:
        if change.superseded is not None:
            await conn.execute(
                "UPDATE product_prices SET archived_at = $3 WHERE merchant_id = $1 AND price_id = $2",
                change.superseded.merchant_id,
                change.superseded.price_id,
                change.superseded.archived_at,
            )
        price = change.price
        await conn.execute(
            f"INSERT INTO product_prices ({_PRICE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            price.merchant_id,
            price.price_id,
            price.product_id,
            price.amount.currency,
            price.amount.amount_minor,
            price.effective_at,
            price.archived_at,
            price.created_at,
        )
    except (asyncpg.ExclusionViolationError, asyncpg.UniqueViolationError) as error:
        raise FailedPrecondition(
            "the price version would overlap another version", reason="PRICE_VERSION_OVERLAP"
        ) from error


async def list_prices(
    conn: asyncpg.Connection, merchant_id: str, product_id: UUID, page: PageRequest, *, currency: str | None
) -> Page[ProductPrice]:
    after_currency, after_time, after_id = page.after if page.after is not None else (None, None, None)
    rows = await conn.fetch(
        f"""
        SELECT {_PRICE_COLUMNS} FROM product_prices
         WHERE merchant_id = $1 AND product_id = $2
           AND ($3::text IS NULL OR currency = $3)
           AND ($4::text IS NULL OR (currency, effective_at, price_id) > ($4, $5::timestamptz, $6::uuid))
         ORDER BY currency, effective_at, price_id
         LIMIT $7
        """,
        merchant_id,
        product_id,
        currency,
        after_currency,
        after_time,
        after_id,
        page.size + 1,
    )
    return page_of(
        [_price(row) for row in rows], page, lambda p: (p.amount.currency, p.effective_at, p.price_id)
    )


_OFFER_SELECT = """
    SELECT p.merchant_id, p.product_id, p.name, p.credits, p.access_period_days, p.distribution,
           p.grant_policy, p.created_at, p.archived_at,
           pp.merchant_id AS price_merchant_id, pp.price_id AS price_price_id,
           pp.product_id AS price_product_id, pp.currency AS price_currency,
           pp.amount_minor AS price_amount_minor, pp.effective_at AS price_effective_at,
           pp.archived_at AS price_archived_at, pp.created_at AS price_created_at
      FROM products p
      JOIN product_prices pp ON pp.merchant_id = p.merchant_id AND pp.product_id = p.product_id
     WHERE p.merchant_id = $1
       AND p.distribution = 'sellable' AND p.archived_at IS NULL
       AND pp.currency = $2
       AND tstzrange(pp.effective_at, pp.archived_at, '[)') @> $3::timestamptz
"""


def _offer(row: asyncpg.Record) -> Offer:
    return Offer(product=_product(row), price=_price(row, prefix="price_"))


async def list_offers(
    conn: asyncpg.Connection, merchant_id: str, page: PageRequest, *, currency: str, at: datetime
) -> Page[Offer]:
    after_time, after_id = page.after if page.after is not None else (None, None)
    rows = await conn.fetch(
        f"""
        {_OFFER_SELECT}
           AND ($4::timestamptz IS NULL OR (p.created_at, p.product_id) > ($4, $5::uuid))
         ORDER BY p.created_at, p.product_id
         LIMIT $6
        """,
        merchant_id,
        currency,
        at,
        after_time,
        after_id,
        page.size + 1,
    )
    return page_of(
        [_offer(row) for row in rows], page, lambda o: (o.product.created_at, o.product.product_id)
    )


# --- operation types ----------------------------------------------------------------------

_VERSION_COLUMNS = """
    merchant_id, operation_code, version, resource_unit, credits_per_unit, effective_at, ends_at,
    created_at
"""


def _version(row: asyncpg.Record) -> OperationTypeVersion:
    return OperationTypeVersion(
        merchant_id=row["merchant_id"],
        operation_code=row["operation_code"],
        version=row["version"],
        resource_unit=row["resource_unit"],
        credits_per_unit=row["credits_per_unit"],
        effective_at=row["effective_at"],
        ends_at=row["ends_at"],
        created_at=row["created_at"],
    )


def _operation_code_lock_key(merchant_id: str, operation_code: str) -> int:
    digest = hashlib.sha256(f"tally_catalog.operation_type/{merchant_id}/{operation_code}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def lock_operation_code(conn: asyncpg.Connection, merchant_id: str, operation_code: str) -> None:
    """Serialises schedulings of one code until the transaction ends.

    A row lock cannot do it: the first version of a code has no row to lock yet.
    """
    key = _operation_code_lock_key(merchant_id, operation_code)
    await conn.execute("SELECT pg_advisory_xact_lock($1)", key)


async def operation_type_versions(
    conn: asyncpg.Connection, merchant_id: str, operation_code: str
) -> list[OperationTypeVersion]:
    rows = await conn.fetch(
        f"""
        SELECT {_VERSION_COLUMNS} FROM operation_type_versions
         WHERE merchant_id = $1 AND operation_code = $2
         ORDER BY version
        """,
        merchant_id,
        operation_code,
    )
    return [_version(row) for row in rows]


async def save_operation_type_change(conn: asyncpg.Connection, change: OperationTypeChange) -> None:
    """Ends the previous version, then inserts the new one."""
    try:
        if change.previous is not None:
            await conn.execute(
                """
                UPDATE operation_type_versions SET ends_at = $4
                 WHERE merchant_id = $1 AND operation_code = $2 AND version = $3
                """,
                change.previous.merchant_id,
                change.previous.operation_code,
                change.previous.version,
                change.previous.ends_at,
            )
        version = change.version
        await conn.execute(
            f"""
            INSERT INTO operation_type_versions ({_VERSION_COLUMNS})
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            """,
            version.merchant_id,
            version.operation_code,
            version.version,
            version.resource_unit,
            version.credits_per_unit,
            version.effective_at,
            version.ends_at,
            version.created_at,
        )
    except (asyncpg.ExclusionViolationError, asyncpg.UniqueViolationError) as error:
        raise FailedPrecondition(
            "the operation type version would overlap another version",
            reason="OPERATION_TYPE_VERSION_OVERLAP",
        ) from error


async def get_operation_type_version(
    conn: asyncpg.Connection, merchant_id: str, operation_code: str, version: int
) -> OperationTypeVersion:
    row = await conn.fetchrow(
        f"""
        SELECT {_VERSION_COLUMNS} FROM operation_type_versions
         WHERE merchant_id = $1 AND operation_code = $2 AND version = $3
        """,
        merchant_id,
        operation_code,
        version,
    )
    if row is None:
        raise NotFound(
            f"operation type {operation_code} has no version {version}",
            reason="OPERATION_TYPE_VERSION_NOT_FOUND",
        )
    return _version(row)


async def list_operation_type_versions(
    conn: asyncpg.Connection, merchant_id: str, page: PageRequest, *, operation_code: str | None
) -> Page[OperationTypeVersion]:
    """Versions of one code, or of every code when `operation_code` is None."""
    after_code, after_version = page.after if page.after is not None else (None, None)
    rows = await conn.fetch(
        f"""
        SELECT {_VERSION_COLUMNS} FROM operation_type_versions
         WHERE merchant_id = $1
           AND ($2::text IS NULL OR operation_code = $2)
           AND ($3::text IS NULL OR (operation_code, version) > ($3, $4::integer))
         ORDER BY operation_code, version
         LIMIT $5
        """,
        merchant_id,
        operation_code,
        after_code,
        after_version,
        page.size + 1,
    )
    return page_of([_version(row) for row in rows], page, lambda v: (v.operation_code, v.version))


# --- subscription plans -------------------------------------------------------------------

_PLAN_COLUMNS = """
    merchant_id, plan_id, name, price_amount_minor, price_currency, billing_interval_unit,
    billing_interval_count, trial_days, recurring_grant_product_id, dunning_retry_delays_seconds,
    dunning_final_action, created_at
"""


def _plan(row: asyncpg.Record) -> SubscriptionPlan:
    return SubscriptionPlan(
        plan_id=row["plan_id"],
        merchant_id=row["merchant_id"],
        name=row["name"],
        price=Money(amount_minor=row["price_amount_minor"], currency=row["price_currency"]),
        billing_interval=BillingInterval(
            unit=IntervalUnit(row["billing_interval_unit"]), count=row["billing_interval_count"]
        ),
        trial_days=row["trial_days"],
        recurring_grant_product_id=row["recurring_grant_product_id"],
        dunning=DunningPolicy(
            retry_delays=tuple(timedelta(seconds=s) for s in row["dunning_retry_delays_seconds"]),
            final_action=FinalAction(row["dunning_final_action"]),
        ),
        created_at=row["created_at"],
    )


def _seconds(delays: Sequence[timedelta]) -> list[int]:
    return [int(delay.total_seconds()) for delay in delays]


async def insert_plan(conn: asyncpg.Connection, plan: SubscriptionPlan) -> None:
    await conn.execute(
        f"""
        INSERT INTO subscription_plans ({_PLAN_COLUMNS})
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        """,
        plan.merchant_id,
        plan.plan_id,
        plan.name,
        plan.price.amount_minor,
        plan.price.currency,
        plan.billing_interval.unit.value,
        plan.billing_interval.count,
        plan.trial_days,
        plan.recurring_grant_product_id,
        _seconds(plan.dunning.retry_delays),
        plan.dunning.final_action.value,
        plan.created_at,
    )


async def get_plan(conn: asyncpg.Connection, merchant_id: str, plan_id: UUID) -> SubscriptionPlan:
    row = await conn.fetchrow(
        f"SELECT {_PLAN_COLUMNS} FROM subscription_plans WHERE merchant_id = $1 AND plan_id = $2",
        merchant_id,
        plan_id,
    )
    if row is None:
        raise NotFound(f"subscription plan {plan_id} does not exist", reason="SUBSCRIPTION_PLAN_NOT_FOUND")
    return _plan(row)


async def list_plans(conn: asyncpg.Connection, merchant_id: str, page: PageRequest) -> Page[SubscriptionPlan]:
    after_time, after_id = page.after if page.after is not None else (None, None)
    rows = await conn.fetch(
        f"""
        SELECT {_PLAN_COLUMNS} FROM subscription_plans
         WHERE merchant_id = $1
           AND ($2::timestamptz IS NULL OR (created_at, plan_id) > ($2, $3::uuid))
         ORDER BY created_at, plan_id
         LIMIT $4
        """,
        merchant_id,
        after_time,
        after_id,
        page.size + 1,
    )
    return page_of([_plan(row) for row in rows], page, lambda p: (p.created_at, p.plan_id))
