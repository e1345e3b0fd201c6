-- The ledger of one merchant (each merchant has a database of its own). Every row still
-- carries merchant_id and every query filters on it. The database enforces every rule it
-- can on its own, so that a bug above it cannot store what the domain forbids:
--
-- * entries are append-only (UPDATE, DELETE and TRUNCATE are refused);
-- * an account's balance and debt, and a lot's remaining and consumed credits, are kept by
--   the trigger that inserts each entry, in the entry's transaction, and by nothing else:
--   balance = sum of the user's entries, debt = minus the sum of those without a lot,
--   remaining = sum of the lot's entries. Accounts and lots are therefore inserted empty
--   (the defaults) and filled by their entries;
-- * a lot is opened by one entry of its full credits, never consumes credits past its
--   expiry, and holds between 0 and its credits;
-- * the two DEBT_SETTLEMENT entries issued with a lot balance each other (checked at commit);
-- * one open operation per merchant and user; one lot per settled order; one lot per grant
--   key; one chargeback per order.
--
-- Writing order for the store: the account row, then a new lot's row, then its entries in
-- the order the domain's Posting lists them.

CREATE TABLE accounts (
    merchant_id   text           NOT NULL CHECK (merchant_id ~ '^[a-z][a-z0-9-]{2,31}$'),
    user_id       text           NOT NULL CHECK (user_id ~ '^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$'),
    balance       numeric(20, 6) NOT NULL DEFAULT 0,
    debt          numeric(20, 6) NOT NULL DEFAULT 0 CHECK (debt >= 0),
    registered_at timestamptz    NOT NULL,
    PRIMARY KEY (merchant_id, user_id)
);

CREATE TABLE lots (
    merchant_id        text           NOT NULL,
    lot_id             uuid           NOT NULL,
    user_id            text           NOT NULL,
    source             text           NOT NULL CHECK (
        source IN ('purchase', 'grant', 'cashback', 'subscription', 'promotion', 'adjustment')
    ),
    credits            numeric(20, 6) NOT NULL CHECK (credits > 0),
    remaining          numeric(20, 6) NOT NULL DEFAULT 0,
    -- What the user had the use of: debits, debt settled, negative adjustments, and credits
    -- taken to pay back another lot's chargeback. What left the lot otherwise expired or was
    -- revoked by the lot's own refund or chargeback.
    consumed           numeric(20, 6) NOT NULL DEFAULT 0,
    issued_at          timestamptz    NOT NULL,
    -- NULL: never expires.
    expires_at         timestamptz    CHECK (expires_at > issued_at),
    -- What the lot was issued for: `order:<id>`, `grant:<key>`, `adjustment:<request id>`.
    reference          text           NOT NULL CHECK (length(reference) BETWEEN 1 AND 300),
    product_id         uuid,
    -- The settled order and its payment, on purchase lots only.
    order_id           text           CHECK (order_id ~ '^[\x21-\x7e]{1,128}$'),
    paid_amount_minor  bigint         CHECK (paid_amount_minor >= 0),
    paid_currency      text           CHECK (paid_currency ~ '^[A-Z]{3}$'),
    provider_reference text           CHECK (length(provider_reference) BETWEEN 1 AND 200),
    payment_id         text           CHECK (length(payment_id) BETWEEN 1 AND 128),
    reversal           text           CHECK (reversal IN ('refunded', 'charged_back')),
    reversed_at        timestamptz    CHECK (reversed_at >= issued_at),
    PRIMARY KEY (merchant_id, lot_id),
    UNIQUE (merchant_id, user_id, lot_id),
    FOREIGN KEY (merchant_id, user_id) REFERENCES accounts (merchant_id, user_id),
    CONSTRAINT lots_credits_accounted CHECK (remaining >= 0 AND consumed >= 0 AND remaining + consumed <= credits),
    CONSTRAINT lots_purchase_iff_order CHECK ((source = 'purchase') = (order_id IS NOT NULL)),
    CONSTRAINT lots_purchase_paid CHECK (
        (order_id IS NULL AND paid_amount_minor IS NULL AND paid_currency IS NULL
            AND provider_reference IS NULL AND payment_id IS NULL)
        OR (order_id IS NOT NULL AND product_id IS NOT NULL AND paid_amount_minor IS NOT NULL
            AND paid_currency IS NOT NULL AND provider_reference IS NOT NULL)
    ),
    CONSTRAINT lots_only_purchases_reversed CHECK (reversal IS NULL OR source = 'purchase'),
    CONSTRAINT lots_reversed_when CHECK ((reversal IS NULL) = (reversed_at IS NULL)),
    CONSTRAINT lots_adjustments_never_expire CHECK (source <> 'adjustment' OR expires_at IS NULL)
);

-- One lot per settled order.
CREATE UNIQUE INDEX lots_one_per_order ON lots (merchant_id, order_id) WHERE source = 'purchase';
-- FIFO selection: a user's lots with credits left, soonest expiry first, never-expiring last,
-- then by issue (the domain's fifo_key). Lots past expiry are filtered out by the query.
CREATE INDEX lots_fifo ON lots (merchant_id, user_id, expires_at ASC NULLS LAST, issued_at, lot_id)
    WHERE remaining > 0;
-- The expiry job: lots whose expiry has come with credits left, claimed by expiry time.
CREATE INDEX lots_expiry_due ON lots (merchant_id, expires_at) WHERE remaining > 0 AND expires_at IS NOT NULL;
-- ListLots: a user's lots by issue.
CREATE INDEX lots_by_issue ON lots (merchant_id, user_id, issued_at, lot_id);

-- Two-phase operations; the rate is pinned at opening.
CREATE TABLE operations (
    merchant_id       text           NOT NULL,
    operation_id      uuid           NOT NULL,
    user_id           text           NOT NULL,
    operation_code    text           NOT NULL CHECK (operation_code ~ '^[a-z][a-z0-9_.-]{0,62}$'),
    operation_version integer        NOT NULL CHECK (operation_version >= 1),
    resource_unit     text           NOT NULL CHECK (resource_unit ~ '^[a-z][a-z0-9_]{0,31}$'),
    credits_per_unit  numeric(20, 6) NOT NULL CHECK (credits_per_unit > 0),
    workflow_id       text           CHECK (workflow_id ~ '^[\x21-\x7e]{1,128}$'),
    state             text           NOT NULL CHECK (state IN ('open', 'closed', 'canceled', 'timed_out')),
    opened_at         timestamptz    NOT NULL,
    closed_at         timestamptz    CHECK (closed_at >= opened_at),
    -- Set once closed.
    resource_amount   numeric(20, 6) CHECK (resource_amount >= 0),
    credits           numeric(20, 6) CHECK (credits >= 0),
    PRIMARY KEY (merchant_id, operation_id),
    UNIQUE (merchant_id, user_id, operation_id),
    FOREIGN KEY (merchant_id, user_id) REFERENCES accounts (merchant_id, user_id),
    CONSTRAINT operations_closed_when CHECK ((state = 'open') = (closed_at IS NULL)),
    CONSTRAINT operations_recorded_when_closed CHECK (
        (state = 'closed') = (resource_amount IS NOT NULL) AND (state = 'closed') = (credits IS NOT NULL)
    )
);

-- One open operation per merchant and user.
CREATE UNIQUE INDEX operations_one_open_per_user ON operations (merchant_id, user_id) WHERE state = 'open';
-- The timeout job: open operations, oldest first.
CREATE INDEX operations_open_by_age ON operations (merchant_id, opened_at) WHERE state = 'open';

-- The append-only ledger.
CREATE TABLE entries (
    -- Insertion order: history pages and the settlement check rely on it.
    entry_seq         bigint         GENERATED ALWAYS AS IDENTITY,
    merchant_id       text           NOT NULL,
    entry_id          uuid           NOT NULL,
    user_id           text           NOT NULL,
    kind              text           NOT NULL CHECK (
        kind IN ('lot_issued', 'debit', 'debt_settlement', 'refund_revocation', 'chargeback_revocation',
                 'expiry', 'adjustment')
    ),
    amount            numeric(20, 6) NOT NULL CHECK (amount <> 0),
    -- NULL: the entry moves the debt instead of a lot.
    lot_id            uuid,
    occurred_at       timestamptz    NOT NULL,
    -- What caused the entry, `<kind>:<key>` (order, grant, operation, refund, ...).
    reference         text           NOT NULL CHECK (length(reference) BETWEEN 1 AND 300),
    -- The operation context, on debits.
    operation_id      uuid,
    operation_code    text,
    operation_version integer,
    resource_amount   numeric(20, 6),
    resource_unit     text,
    credits_per_unit  numeric(20, 6),
    workflow_id       text,
    -- The purchase lot being revoked, on refund and chargeback revocations.
    revoked_lot_id    uuid,
    -- Why and who, on adjustments.
    reason            text           CHECK (length(reason) BETWEEN 1 AND 500),
    actor             text           CHECK (length(actor) BETWEEN 1 AND 200),
    PRIMARY KEY (merchant_id, entry_id),
    UNIQUE (entry_seq),
    FOREIGN KEY (merchant_id, user_id) REFERENCES accounts (merchant_id, user_id),
    FOREIGN KEY (merchant_id, user_id, lot_id) REFERENCES lots (merchant_id, user_id, lot_id),
    FOREIGN KEY (merchant_id, user_id, revoked_lot_id) REFERENCES lots (merchant_id, user_id, lot_id),
    FOREIGN KEY (merchant_id, user_id, operation_id) REFERENCES operations (merchant_id, user_id, operation_id),
    CONSTRAINT entries_kind_shape CHECK (
        CASE kind
            WHEN 'lot_issued' THEN amount > 0 AND lot_id IS NOT NULL
            WHEN 'debit' THEN amount < 0
            -- The pair: minus on the new lot, plus on the debt.
            WHEN 'debt_settlement' THEN (amount < 0) = (lot_id IS NOT NULL)
            WHEN 'refund_revocation' THEN amount < 0 AND lot_id IS NOT NULL AND revoked_lot_id = lot_id
            WHEN 'chargeback_revocation' THEN amount < 0 AND revoked_lot_id IS NOT NULL
            WHEN 'expiry' THEN amount < 0 AND lot_id IS NOT NULL
            WHEN 'adjustment' THEN (amount < 0 OR lot_id IS NOT NULL) AND reason IS NOT NULL AND actor IS NOT NULL
        END
    ),
    CONSTRAINT entries_operation_context CHECK (
        (kind = 'debit') = (operation_id IS NOT NULL)
        AND (operation_id IS NULL) = (operation_code IS NULL)
        AND (operation_id IS NULL) = (operation_version IS NULL)
        AND (operation_id IS NULL) = (resource_amount IS NULL)
        AND (operation_id IS NULL) = (resource_unit IS NULL)
        AND (operation_id IS NULL) = (credits_per_unit IS NULL)
        AND (operation_id IS NOT NULL OR workflow_id IS NULL)
    ),
    CONSTRAINT entries_revocation_context CHECK (
        (kind IN ('refund_revocation', 'chargeback_revocation')) = (revoked_lot_id IS NOT NULL)
    ),
    CONSTRAINT entries_adjustment_context CHECK ((kind = 'adjustment') = (reason IS NOT NULL AND actor IS NOT NULL))
);

-- History pages (user, time, insertion order); INCLUDE lets "balance as of" (sum of amounts,
-- per lot and without a lot, up to an instant) read the index alone.
CREATE INDEX entries_history ON entries (merchant_id, user_id, occurred_at, entry_seq) INCLUDE (amount, lot_id);
CREATE INDEX entries_history_by_kind ON entries (merchant_id, user_id, kind, occurred_at, entry_seq);
CREATE INDEX entries_history_by_workflow ON entries (merchant_id, user_id, workflow_id, occurred_at, entry_seq)
    WHERE workflow_id IS NOT NULL;
-- A lot's own entries (its opening, its history).
CREATE INDEX entries_by_lot ON entries (merchant_id, lot_id, entry_seq) WHERE lot_id IS NOT NULL;
CREATE INDEX entries_by_operation ON entries (merchant_id, operation_id) WHERE operation_id IS NOT NULL;
CREATE INDEX entries_settlements ON entries (merchant_id, user_id, reference) WHERE kind = 'debt_settlement';

-- Grants issued, by their key: one lot per key, ever. Sign-up grants use keys
-- `signup:<product id>:<user id>`, which callers may not choose.
CREATE TABLE grants_applied (
    merchant_id text        NOT NULL,
    grant_key   text        NOT NULL CHECK (grant_key ~ '^[\x21-\x7e]{1,200}$'),
    user_id     text        NOT NULL,
    lot_id      uuid        NOT NULL,
    product_id  uuid,
    applied_at  timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, grant_key),
    UNIQUE (merchant_id, lot_id),
    FOREIGN KEY (merchant_id, user_id, lot_id) REFERENCES lots (merchant_id, user_id, lot_id)
);

-- Refunds and chargebacks applied to purchase lots, by their own reference.
CREATE TABLE lot_reversals (
    merchant_id     text           NOT NULL,
    kind            text           NOT NULL CHECK (kind IN ('refund', 'chargeback')),
    reference       text           NOT NULL CHECK (length(reference) BETWEEN 1 AND 200),
    user_id         text           NOT NULL,
    order_id        text           NOT NULL,
    lot_id          uuid           NOT NULL,
    amount_minor    bigint         NOT NULL CHECK (amount_minor > 0),
    currency        text           NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    credits_revoked numeric(20, 6) NOT NULL CHECK (credits_revoked >= 0),
    reason          text           CHECK (length(reason) <= 500),
    applied_at      timestamptz    NOT NULL,
    PRIMARY KEY (merchant_id, kind, reference),
    FOREIGN KEY (merchant_id, user_id, lot_id) REFERENCES lots (merchant_id, user_id, lot_id)
);

CREATE UNIQUE INDEX lot_reversals_one_chargeback_per_order ON lot_reversals (merchant_id, order_id)
    WHERE kind = 'chargeback';
CREATE INDEX lot_reversals_by_order ON lot_reversals (merchant_id, order_id, applied_at);

-- --- the kept balances ------------------------------------------------------------------------

-- Applies each entry to its lot and its account, in the entry's transaction. Rows run in
-- insertion order, so a multi-row insert behaves as the inserts one by one.
CREATE FUNCTION entries_apply() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    lot       lots%ROWTYPE;
    consuming boolean;
BEGIN
    IF NEW.lot_id IS NOT NULL THEN
        SELECT * INTO lot FROM lots WHERE merchant_id = NEW.merchant_id AND lot_id = NEW.lot_id FOR UPDATE;
        IF NEW.amount > 0 THEN
            IF NEW.amount <> lot.credits
               OR (NEW.kind = 'adjustment') <> (lot.source = 'adjustment')
               OR EXISTS (
                   SELECT 1 FROM entries
                    WHERE merchant_id = NEW.merchant_id AND lot_id = NEW.lot_id AND entry_seq < NEW.entry_seq
               )
            THEN
                RAISE EXCEPTION 'a lot is opened once, by one entry of its full credits (lot %)', NEW.lot_id
                    USING ERRCODE = 'check_violation';
            END IF;
        END IF;
        consuming := NEW.amount < 0 AND (
            NEW.kind IN ('debit', 'debt_settlement', 'adjustment')
            OR (NEW.kind = 'chargeback_revocation' AND NEW.revoked_lot_id <> NEW.lot_id)
        );
        IF consuming AND lot.expires_at <= NEW.occurred_at THEN
            RAISE EXCEPTION 'credits of lot % expired at %; they are never consumed', NEW.lot_id, lot.expires_at
                USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.kind = 'expiry' AND (lot.expires_at IS NULL OR lot.expires_at > NEW.occurred_at) THEN
            RAISE EXCEPTION 'lot % has not expired at %', NEW.lot_id, NEW.occurred_at
                USING ERRCODE = 'check_violation';
        END IF;
        UPDATE lots
           SET remaining = remaining + NEW.amount,
               consumed = consumed - CASE WHEN consuming THEN NEW.amount ELSE 0 END
         WHERE merchant_id = NEW.merchant_id AND lot_id = NEW.lot_id;
    END IF;
    UPDATE accounts
       SET balance = balance + NEW.amount,
           debt = debt - CASE WHEN NEW.lot_id IS NULL THEN NEW.amount ELSE 0 END
     WHERE merchant_id = NEW.merchant_id AND user_id = NEW.user_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER entries_apply
    AFTER INSERT ON entries
    FOR EACH ROW EXECUTE FUNCTION entries_apply();

CREATE FUNCTION entries_append_only() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on entries is refused; write a compensating entry', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER entries_append_only
    BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION entries_append_only();

CREATE TRIGGER entries_no_truncate
    BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION entries_append_only();

-- At commit: the DEBT_SETTLEMENT entries sharing a reference are one balanced pair, minus on
-- a lot and plus on the debt.
CREATE FUNCTION entries_settlement_balanced() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF (SELECT count(*) = 2 AND sum(amount) = 0 AND count(lot_id) = 1
          FROM entries
         WHERE merchant_id = NEW.merchant_id AND user_id = NEW.user_id
           AND kind = 'debt_settlement' AND reference = NEW.reference) IS NOT TRUE
    THEN
        RAISE EXCEPTION 'debt settlement % is not one balanced pair of entries', NEW.reference
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER entries_settlement_balanced
    AFTER INSERT ON entries
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.kind = 'debt_settlement')
    EXECUTE FUNCTION entries_settlement_balanced();

-- Balances change only through entries (the entries_apply trigger, one level down); accounts
-- open empty and are never deleted, since their entries are kept.
CREATE FUNCTION accounts_guard() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'accounts are never deleted (user %)', OLD.user_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.balance <> 0 OR NEW.debt <> 0 THEN
            RAISE EXCEPTION 'an account opens empty; entries fill it (user %)', NEW.user_id
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF (NEW.merchant_id, NEW.user_id, NEW.registered_at) IS DISTINCT FROM (OLD.merchant_id, OLD.user_id, OLD.registered_at)
       OR ((NEW.balance, NEW.debt) IS DISTINCT FROM (OLD.balance, OLD.debt) AND pg_trigger_depth() < 2)
    THEN
        RAISE EXCEPTION 'an account changes only through its entries (user %)', OLD.user_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER accounts_guard
    BEFORE INSERT OR UPDATE OR DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_guard();

-- Lots are immutable but for what their entries keep (remaining, consumed) and their
-- reversal, which only moves forward: none -> refunded -> charged_back, or none -> charged_back.
CREATE FUNCTION lots_guard() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'lots are never deleted (lot %)', OLD.lot_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.remaining <> 0 OR NEW.consumed <> 0 OR NEW.reversal IS NOT NULL THEN
            RAISE EXCEPTION 'a lot opens empty; its opening entry fills it (lot %)', NEW.lot_id
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF (NEW.merchant_id, NEW.lot_id, NEW.user_id, NEW.source, NEW.credits, NEW.issued_at, NEW.expires_at,
        NEW.reference, NEW.product_id, NEW.order_id, NEW.paid_amount_minor, NEW.paid_currency,
        NEW.provider_reference, NEW.payment_id)
       IS DISTINCT FROM
       (OLD.merchant_id, OLD.lot_id, OLD.user_id, OLD.source, OLD.credits, OLD.issued_at, OLD.expires_at,
        OLD.reference, OLD.product_id, OLD.order_id, OLD.paid_amount_minor, OLD.paid_currency,
        OLD.provider_reference, OLD.payment_id)
    THEN
        RAISE EXCEPTION 'lots are immutable (lot %)', OLD.lot_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF (NEW.remaining, NEW.consumed) IS DISTINCT FROM (OLD.remaining, OLD.consumed) AND pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'a lot''s credits change only through its entries (lot %)', OLD.lot_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF (NEW.reversal, NEW.reversed_at) IS DISTINCT FROM (OLD.reversal, OLD.reversed_at)
       AND NOT (
           (OLD.reversal IS NULL AND NEW.reversal IS NOT NULL)
           OR (OLD.reversal IS NOT DISTINCT FROM 'refunded' AND NEW.reversal IS NOT DISTINCT FROM 'charged_back')
       )
    THEN
        RAISE EXCEPTION 'lot % cannot go from % to %', OLD.lot_id,
            coalesce(OLD.reversal, 'no reversal'), coalesce(NEW.reversal, 'no reversal')
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER lots_guard
    BEFORE INSERT OR UPDATE OR DELETE ON lots
    FOR EACH ROW EXECUTE FUNCTION lots_guard();

-- An operation leaves OPEN once, for CLOSED, CANCELED or TIMED_OUT; nothing else changes.
CREATE FUNCTION operations_guard() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'operations are never deleted (operation %)', OLD.operation_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF (NEW.merchant_id, NEW.operation_id, NEW.user_id, NEW.operation_code, NEW.operation_version,
        NEW.resource_unit, NEW.credits_per_unit, NEW.workflow_id, NEW.opened_at)
       IS DISTINCT FROM
       (OLD.merchant_id, OLD.operation_id, OLD.user_id, OLD.operation_code, OLD.operation_version,
        OLD.resource_unit, OLD.credits_per_unit, OLD.workflow_id, OLD.opened_at)
       OR OLD.state <> 'open'
    THEN
        RAISE EXCEPTION 'operation % is % and immutable but for leaving the open state once',
            OLD.operation_id, OLD.state
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER operations_guard
    BEFORE UPDATE OR DELETE ON operations
    FOR EACH ROW EXECUTE FUNCTION operations_guard();

-- Grants and reversals applied are records of what happened: never changed.
CREATE FUNCTION ledger_records_immutable() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION '% rows are immutable: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER grants_applied_immutable
    BEFORE UPDATE OR DELETE ON grants_applied
    FOR EACH ROW EXECUTE FUNCTION ledger_records_immutable();

CREATE TRIGGER lot_reversals_immutable
    BEFORE UPDATE OR DELETE ON lot_reversals
    FOR EACH ROW EXECUTE FUNCTION ledger_records_immutable();
