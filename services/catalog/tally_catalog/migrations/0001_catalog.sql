-- The catalog of one merchant (each merchant has a database of its own). Every row still
-- carries merchant_id and every query filters on it. The database enforces every rule it
-- can on its own, so that a bug above it cannot store what the domain forbids.

-- Exclusion constraints mixing equality on text/uuid with range overlap need btree_gist.
CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE FUNCTION catalog_strictly_increasing_positive(delays bigint[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT coalesce(bool_and(delay > 0 AND (previous IS NULL OR delay > previous)), true)
    FROM (
        SELECT delay, lag(delay) OVER (ORDER BY position) AS previous
        FROM unnest(delays) WITH ORDINALITY AS d (delay, position)
    ) AS ordered
$$;

-- The merchant itself: exactly one row, its configuration.
CREATE TABLE merchant (
    merchant_id               text        PRIMARY KEY CHECK (merchant_id ~ '^[a-z][a-z0-9-]{2,31}$'),
    legal_name                text        NOT NULL CHECK (length(btrim(legal_name)) BETWEEN 1 AND 200),
    tax_id                    text        NOT NULL CHECK (length(btrim(tax_id)) BETWEEN 1 AND 64),
    address_lines             text[]      NOT NULL CHECK (cardinality(address_lines) BETWEEN 1 AND 4),
    locality                  text        NOT NULL CHECK (length(btrim(locality)) BETWEEN 1 AND 100),
    administrative_area       text        NOT NULL CHECK (length(administrative_area) <= 100),
    postal_code               text        NOT NULL CHECK (length(postal_code) <= 100),
    region_code               text        NOT NULL CHECK (region_code ~ '^[A-Z]{2}$'),
    receipt_series_prefix     text        NOT NULL CHECK (receipt_series_prefix ~ '^[A-Z0-9][A-Z0-9-]{0,15}$'),
    tax_rate_percent          numeric(7, 4) NOT NULL CHECK (tax_rate_percent BETWEEN 0 AND 100),
    prices_include_tax        boolean     NOT NULL,
    operation_timeout_seconds integer     NOT NULL CHECK (operation_timeout_seconds BETWEEN 1 AND 86400),
    retention_days            integer     NOT NULL CHECK (retention_days BETWEEN 1 AND 36500),
    default_currency          text        NOT NULL CHECK (default_currency ~ '^[A-Z]{3}$'),
    config_revision           bigint      NOT NULL CHECK (config_revision >= 1),
    created_at                timestamptz NOT NULL,
    updated_at                timestamptz NOT NULL CHECK (updated_at >= created_at)
);

-- One merchant per database: a unique index over a constant admits a single row.
CREATE UNIQUE INDEX merchant_single_row ON merchant ((true));

-- Lot templates. Immutable once created, except for being archived once.
CREATE TABLE products (
    merchant_id        text          NOT NULL REFERENCES merchant (merchant_id),
    product_id         uuid          NOT NULL,
    name               text          NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    credits            numeric(20, 6) NOT NULL CHECK (credits > 0),
    access_period_days integer       CHECK (access_period_days BETWEEN 1 AND 36500),
    distribution       text          NOT NULL CHECK (distribution IN ('sellable', 'grant')),
    grant_policy       text          CHECK (grant_policy IN ('apply_on_signup', 'manual_grant')),
    created_at         timestamptz   NOT NULL,
    archived_at        timestamptz   CHECK (archived_at >= created_at),
    PRIMARY KEY (merchant_id, product_id),
    -- Grants say when they are issued; sellable products never do.
    CONSTRAINT products_grant_policy_iff_grant CHECK ((distribution = 'grant') = (grant_policy IS NOT NULL))
);

CREATE INDEX products_by_creation ON products (merchant_id, created_at, product_id);

CREATE FUNCTION products_immutable() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'products are never deleted (product %)', OLD.product_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF (NEW.merchant_id, NEW.product_id, NEW.name, NEW.credits, NEW.access_period_days,
        NEW.distribution, NEW.grant_policy, NEW.created_at)
       IS DISTINCT FROM
       (OLD.merchant_id, OLD.product_id, OLD.name, OLD.credits, OLD.access_period_days,
        OLD.distribution, OLD.grant_policy, OLD.created_at)
       OR OLD.archived_at IS NOT NULL
    THEN
        RAISE EXCEPTION 'products are immutable; only archiving an active product is allowed (product %)',
            OLD.product_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER products_immutable
    BEFORE UPDATE OR DELETE ON products
    FOR EACH ROW EXECUTE FUNCTION products_immutable();

-- Price versions of sellable products. Per product and currency they form a chain of
-- half-open periods [effective_at, archived_at) that never overlap.
CREATE TABLE product_prices (
    merchant_id  text        NOT NULL,
    price_id     uuid        NOT NULL,
    product_id   uuid        NOT NULL,
    currency     text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    amount_minor bigint      NOT NULL CHECK (amount_minor > 0),
    effective_at timestamptz NOT NULL,
    archived_at  timestamptz CHECK (archived_at > effective_at),
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, price_id),
    FOREIGN KEY (merchant_id, product_id) REFERENCES products (merchant_id, product_id),
    CONSTRAINT product_prices_no_overlap EXCLUDE USING gist (
        merchant_id WITH =,
        product_id WITH =,
        currency WITH =,
        tstzrange(effective_at, archived_at, '[)') WITH &&
    )
);

-- At most one open-ended version per product and currency: the latest.
CREATE UNIQUE INDEX product_prices_one_latest ON product_prices (merchant_id, product_id, currency)
    WHERE archived_at IS NULL;
CREATE INDEX product_prices_by_product ON product_prices (merchant_id, product_id, currency, effective_at);

CREATE FUNCTION product_prices_guard() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    product products%ROWTYPE;
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'price versions are never deleted (price %)', OLD.price_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF (NEW.merchant_id, NEW.price_id, NEW.product_id, NEW.currency, NEW.amount_minor,
            NEW.effective_at, NEW.created_at)
           IS DISTINCT FROM
           (OLD.merchant_id, OLD.price_id, OLD.product_id, OLD.currency, OLD.amount_minor,
            OLD.effective_at, OLD.created_at)
           OR OLD.archived_at IS NOT NULL
        THEN
            RAISE EXCEPTION 'price versions are immutable; only archiving the latest is allowed (price %)',
                OLD.price_id
                USING ERRCODE = 'restrict_violation';
        END IF;
        RETURN NEW;
    END IF;
    SELECT * INTO product FROM products
     WHERE merchant_id = NEW.merchant_id AND product_id = NEW.product_id;
    IF FOUND AND (product.distribution <> 'sellable' OR product.archived_at IS NOT NULL) THEN
        RAISE EXCEPTION 'only active sellable products are priced (product %)', NEW.product_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER product_prices_guard
    BEFORE INSERT OR UPDATE OR DELETE ON product_prices
    FOR EACH ROW EXECUTE FUNCTION product_prices_guard();

-- Versions of operation types (resource -> credits rates). Per code they are numbered 1, 2, …
-- and form a chain of half-open periods [effective_at, ends_at) with no overlap and no gap.
CREATE TABLE operation_type_versions (
    merchant_id      text           NOT NULL REFERENCES merchant (merchant_id),
    operation_code   text           NOT NULL CHECK (operation_code ~ '^[a-z][a-z0-9_.-]{0,62}$'),
    version          integer        NOT NULL CHECK (version >= 1),
    resource_unit    text           NOT NULL CHECK (resource_unit ~ '^[a-z][a-z0-9_]{0,31}$'),
    credits_per_unit numeric(20, 6) NOT NULL CHECK (credits_per_unit > 0),
    effective_at     timestamptz    NOT NULL,
    ends_at          timestamptz    CHECK (ends_at > effective_at),
    created_at       timestamptz    NOT NULL,
    PRIMARY KEY (merchant_id, operation_code, version),
    CONSTRAINT operation_type_versions_no_overlap EXCLUDE USING gist (
        merchant_id WITH =,
        operation_code WITH =,
        tstzrange(effective_at, ends_at, '[)') WITH &&
    )
);

CREATE UNIQUE INDEX operation_type_versions_one_latest ON operation_type_versions (merchant_id, operation_code)
    WHERE ends_at IS NULL;

CREATE FUNCTION operation_type_versions_guard() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    predecessor_end timestamptz;
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'operation type versions are never deleted (% version %)',
            OLD.operation_code, OLD.version
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF (NEW.merchant_id, NEW.operation_code, NEW.version, NEW.resource_unit,
            NEW.credits_per_unit, NEW.effective_at, NEW.created_at)
           IS DISTINCT FROM
           (OLD.merchant_id, OLD.operation_code, OLD.version, OLD.resource_unit,
            OLD.credits_per_unit, OLD.effective_at, OLD.created_at)
           OR OLD.ends_at IS NOT NULL
        THEN
            RAISE EXCEPTION 'operation type versions are immutable; only ending the latest is allowed (% version %)',
                OLD.operation_code, OLD.version
                USING ERRCODE = 'restrict_violation';
        END IF;
        RETURN NEW;
    END IF;
    -- No gap: a version follows its predecessor exactly where that one ends (the
    -- predecessor is ended first, in the same transaction).
    IF NEW.version > 1 THEN
        SELECT ends_at INTO predecessor_end FROM operation_type_versions
         WHERE merchant_id = NEW.merchant_id AND operation_code = NEW.operation_code
           AND version = NEW.version - 1;
        IF NOT FOUND OR predecessor_end IS DISTINCT FROM NEW.effective_at THEN
            RAISE EXCEPTION 'version % of % must start where version % ends', NEW.version,
                NEW.operation_code, NEW.version - 1
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER operation_type_versions_guard
    BEFORE INSERT OR UPDATE OR DELETE ON operation_type_versions
    FOR EACH ROW EXECUTE FUNCTION operation_type_versions_guard();

-- Subscription plans are immutable: a different offer is a new plan.
CREATE TABLE subscription_plans (
    merchant_id                  text        NOT NULL REFERENCES merchant (merchant_id),
    plan_id                      uuid        NOT NULL,
    name                         text        NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    price_amount_minor           bigint      NOT NULL CHECK (price_amount_minor > 0),
    price_currency               text        NOT NULL CHECK (price_currency ~ '^[A-Z]{3}$'),
    billing_interval_unit        text        NOT NULL CHECK (billing_interval_unit IN ('day', 'week', 'month', 'year')),
    billing_interval_count       integer     NOT NULL CHECK (billing_interval_count >= 1),
    trial_days                   integer     NOT NULL CHECK (trial_days BETWEEN 0 AND 365),
    recurring_grant_product_id   uuid        NOT NULL,
    dunning_retry_delays_seconds bigint[]    NOT NULL CHECK (
        cardinality(dunning_retry_delays_seconds) BETWEEN 1 AND 10
        AND catalog_strictly_increasing_positive(dunning_retry_delays_seconds)
    ),
    dunning_final_action         text        NOT NULL CHECK (dunning_final_action IN ('suspend', 'cancel')),
    created_at                   timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, plan_id),
    FOREIGN KEY (merchant_id, recurring_grant_product_id) REFERENCES products (merchant_id, product_id),
    -- At most five years per period, whatever the unit.
    CONSTRAINT subscription_plans_interval_at_most_five_years CHECK (
        billing_interval_count <= CASE billing_interval_unit
            WHEN 'day' THEN 1826 WHEN 'week' THEN 260 WHEN 'month' THEN 60 ELSE 5 END
    )
);

CREATE INDEX subscription_plans_by_creation ON subscription_plans (merchant_id, created_at, plan_id);

CREATE FUNCTION subscription_plans_guard() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        RAISE EXCEPTION 'subscription plans are immutable (plan %)', OLD.plan_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM products
         WHERE merchant_id = NEW.merchant_id AND product_id = NEW.recurring_grant_product_id
           AND distribution = 'grant' AND grant_policy = 'manual_grant' AND archived_at IS NULL
    ) THEN
        RAISE EXCEPTION 'a recurring grant must be an active MANUAL_GRANT product (product %)',
            NEW.recurring_grant_product_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER subscription_plans_guard
    BEFORE INSERT OR UPDATE OR DELETE ON subscription_plans
    FOR EACH ROW EXECUTE FUNCTION subscription_plans_guard();
