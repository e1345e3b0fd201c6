-- The payments of one merchant (each merchant has a database of its own). Every row still
-- carries merchant_id and every query filters on it. The database refuses what the domain
-- (`tally_payment_gateway.domain`) forbids wherever it can say so on its own:
--
-- * amounts: 0 < amount, 0 <= refunded <= captured <= amount, chargeback <= captured;
-- * a payment's call to the provider in flight (or whose outcome is unknown) is all of its
--   `pending_*` columns or none, and an UNKNOWN payment always has one;
-- * at most one payment per order is open or paid (every state but failed and voided);
-- * one refund record per provider transaction, one chargeback per payment;
-- * the audit trail is append-only;
-- * saved payment tokens exist only as AES-256-GCM ciphertext under a key id;
-- * a provider notification is received once per notification id.

CREATE TABLE payment_methods (
    merchant_id       text        NOT NULL CHECK (merchant_id ~ '^[a-z][a-z0-9-]{2,31}$'),
    payment_method_id uuid        NOT NULL,
    user_id           text        NOT NULL CHECK (user_id ~ '^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$'),
    provider          text        NOT NULL CHECK (provider ~ '^[a-z][a-z0-9_]{0,31}$'),
    label             text        NOT NULL CHECK (length(label) <= 64),
    -- The provider's token sealed by `crypto.TokenVault`: the id of the key it is sealed
    -- under, and nonce (12 bytes) || ciphertext || tag (16 bytes), bound to this row.
    key_id            text        NOT NULL CHECK (key_id ~ '^[A-Za-z0-9._-]{1,32}$'),
    token_ciphertext  bytea       NOT NULL CHECK (length(token_ciphertext) > 28),
    created_at        timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, payment_method_id),
    -- Lets a payment name the method together with its payer (see payments).
    UNIQUE (merchant_id, user_id, payment_method_id)
);

CREATE TABLE payments (
    merchant_id              text        NOT NULL CHECK (merchant_id ~ '^[a-z][a-z0-9-]{2,31}$'),
    payment_id               uuid        NOT NULL,
    user_id                  text        NOT NULL CHECK (user_id ~ '^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$'),
    order_id                 text        NOT NULL CHECK (order_id ~ '^[\x21-\x7e]{1,128}$'),
    product_id               uuid        NOT NULL,
    intent                   text        NOT NULL CHECK (intent IN ('purchase', 'authorize')),
    state                    text        NOT NULL CHECK (state IN (
        'pending', 'authorized', 'captured', 'partially_refunded', 'refunded', 'voided', 'failed',
        'unknown', 'charged_back'
    )),
    currency                 text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    amount_minor             bigint      NOT NULL CHECK (amount_minor > 0),
    captured_minor           bigint      NOT NULL DEFAULT 0,
    -- The sum of the payment's refunds, kept with them in each transaction.
    refunded_minor           bigint      NOT NULL DEFAULT 0,
    provider                 text        NOT NULL CHECK (provider ~ '^[a-z][a-z0-9_]{0,31}$'),
    -- The provider's transaction id of the authorization (or purchase); '' until it answers.
    provider_reference       text        NOT NULL DEFAULT '' CHECK (length(provider_reference) <= 64),
    -- The payment's reference at the provider (Authorize.Net `invoiceNumber`), derived from
    -- its id; notifications and reconciliation find the payment by it.
    provider_order_reference text        NOT NULL CHECK (provider_order_reference ~ '^[0-9a-f]{20}$'),
    payment_method_id        uuid,
    description              text        NOT NULL DEFAULT '' CHECK (length(description) <= 255),
    held_for_review          boolean     NOT NULL DEFAULT false,
    failure_code             text        NOT NULL DEFAULT '' CHECK (length(failure_code) <= 64),
    failure_message          text        NOT NULL DEFAULT '' CHECK (length(failure_message) <= 1000),
    -- The card as the provider reports it: masked number and brand, never a card number.
    account_suffix           text        NOT NULL DEFAULT '' CHECK (account_suffix ~ '^[X0-9]{0,8}$'),
    account_type             text        NOT NULL DEFAULT '' CHECK (length(account_type) <= 32),
    -- The call to the provider in flight, or whose outcome is unknown.
    pending_operation        text        CHECK (pending_operation IN ('purchase', 'authorize', 'capture', 'void', 'refund')),
    pending_resume_state     text        CHECK (pending_resume_state IN ('pending', 'authorized', 'captured', 'partially_refunded')),
    pending_amount_minor     bigint      CHECK (pending_amount_minor > 0),
    pending_started_at       timestamptz,
    pending_refund_id        uuid,
    pending_reason           text        CHECK (length(pending_reason) <= 500),
    created_at               timestamptz NOT NULL,
    updated_at               timestamptz NOT NULL CHECK (updated_at >= created_at),
    PRIMARY KEY (merchant_id, payment_id),
    UNIQUE (merchant_id, provider_order_reference),
    -- A saved method is only ever charged for its own user.
    FOREIGN KEY (merchant_id, user_id, payment_method_id)
        REFERENCES payment_methods (merchant_id, user_id, payment_method_id),
    CONSTRAINT payments_amounts CHECK (
        captured_minor BETWEEN 0 AND amount_minor AND refunded_minor BETWEEN 0 AND captured_minor
    ),
    CONSTRAINT payments_captured_when CHECK (
        state NOT IN ('captured', 'partially_refunded', 'refunded', 'charged_back') OR captured_minor > 0
    ),
    CONSTRAINT payments_refunds_match_state CHECK (
        CASE state
            WHEN 'captured' THEN refunded_minor = 0
            WHEN 'partially_refunded' THEN refunded_minor > 0 AND refunded_minor < captured_minor
            WHEN 'refunded' THEN refunded_minor = captured_minor
            -- Whatever it was when the bank reversed it, or when a call's outcome went unknown.
            WHEN 'charged_back' THEN true
            WHEN 'unknown' THEN true
            ELSE refunded_minor = 0
        END
    ),
    CONSTRAINT payments_failure_explained CHECK (state <> 'failed' OR failure_code <> ''),
    CONSTRAINT payments_held_while_pending CHECK (NOT held_for_review OR state = 'pending'),
    CONSTRAINT payments_pending_whole CHECK (
        (pending_operation IS NULL) = (pending_resume_state IS NULL)
        AND (pending_operation IS NULL) = (pending_amount_minor IS NULL)
        AND (pending_operation IS NULL) = (pending_started_at IS NULL)
        AND (pending_operation IS NULL) = (pending_reason IS NULL)
        AND (pending_refund_id IS NOT NULL) = (pending_operation IS NOT DISTINCT FROM 'refund')
    ),
    CONSTRAINT payments_unknown_has_pending CHECK (state <> 'unknown' OR pending_operation IS NOT NULL),
    CONSTRAINT payments_final_is_idle CHECK (
        state NOT IN ('refunded', 'voided', 'failed', 'charged_back') OR pending_operation IS NULL
    )
);

-- At most one payment per order holds it (`domain.ORDER_HOLDING_STATES`): failed and voided
-- payments took no money, so the order may be paid again.
CREATE UNIQUE INDEX payments_one_holding_per_order ON payments (merchant_id, order_id)
    WHERE state NOT IN ('failed', 'voided');
-- ListPayments: newest first, for the merchant, a user or an order.
CREATE INDEX payments_newest ON payments (merchant_id, created_at DESC, payment_id DESC);
CREATE INDEX payments_of_user ON payments (merchant_id, user_id, created_at DESC, payment_id DESC);
CREATE INDEX payments_of_order ON payments (merchant_id, order_id);
-- A refund notification names the captured transaction it gives money back from.
CREATE INDEX payments_by_provider_reference ON payments (merchant_id, provider_reference)
    WHERE provider_reference <> '';
-- Reconciliation: calls in flight or unknown, oldest first.
CREATE INDEX payments_unsettled ON payments (merchant_id, pending_started_at, payment_id)
    WHERE pending_operation IS NOT NULL;

CREATE TABLE refunds (
    merchant_id        text        NOT NULL,
    refund_id          uuid        NOT NULL,
    payment_id         uuid        NOT NULL,
    amount_minor       bigint      NOT NULL CHECK (amount_minor > 0),
    -- The provider's transaction that moved the money back.
    provider_reference text        NOT NULL CHECK (length(provider_reference) BETWEEN 1 AND 64),
    origin             text        NOT NULL CHECK (origin IN ('tally', 'provider')),
    reason             text        NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
    created_at         timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, refund_id),
    UNIQUE (merchant_id, payment_id, provider_reference),
    FOREIGN KEY (merchant_id, payment_id) REFERENCES payments (merchant_id, payment_id)
);

CREATE TABLE chargebacks (
    merchant_id    text        NOT NULL,
    payment_id     uuid        NOT NULL,
    chargeback_id  text        NOT NULL CHECK (length(chargeback_id) BETWEEN 1 AND 128),
    amount_minor   bigint      NOT NULL CHECK (amount_minor > 0),
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, payment_id),
    UNIQUE (merchant_id, chargeback_id),
    FOREIGN KEY (merchant_id, payment_id) REFERENCES payments (merchant_id, payment_id)
);

-- One row per change of a payment: who, under which correlation id, from which state to
-- which. Details hold amounts and references, never card data.
CREATE TABLE payment_audit (
    audit_id       bigserial   PRIMARY KEY,
    merchant_id    text        NOT NULL,
    payment_id     uuid        NOT NULL,
    action         text        NOT NULL CHECK (action ~ '^[a-z][a-z_]{0,63}$'),
    actor          text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 300),
    -- NULL for the row that opened the payment.
    state_before   text,
    state_after    text        NOT NULL,
    correlation_id text        NOT NULL CHECK (length(correlation_id) <= 128),
    details        jsonb       NOT NULL DEFAULT '{}',
    at             timestamptz NOT NULL,
    FOREIGN KEY (merchant_id, payment_id) REFERENCES payments (merchant_id, payment_id)
);

CREATE INDEX payment_audit_of_payment ON payment_audit (merchant_id, payment_id, audit_id);

CREATE FUNCTION payment_audit_append_only() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'the payment audit trail is append-only: % is refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER payment_audit_append_only
    BEFORE UPDATE OR DELETE ON payment_audit
    FOR EACH ROW EXECUTE FUNCTION payment_audit_append_only();

CREATE TRIGGER payment_audit_no_truncate
    BEFORE TRUNCATE ON payment_audit
    FOR EACH STATEMENT EXECUTE FUNCTION payment_audit_append_only();

-- Provider notifications (webhooks) as received, once per notification id: the webhook RPC
-- records one and enqueues it for processing in the same transaction, and the consumer
-- records what came of it.
CREATE TABLE webhook_notifications (
    merchant_id     text        NOT NULL,
    notification_id text        NOT NULL CHECK (length(notification_id) BETWEEN 1 AND 128),
    provider        text        NOT NULL CHECK (provider ~ '^[a-z][a-z0-9_]{0,31}$'),
    event_type      text        NOT NULL CHECK (length(event_type) BETWEEN 1 AND 128),
    -- The transaction it is about ('' when it is about something else).
    entity_id       text        NOT NULL CHECK (length(entity_id) <= 128),
    -- The body exactly as received, which the signature covers.
    body            bytea       NOT NULL,
    received_at     timestamptz NOT NULL,
    processed_at    timestamptz,
    -- What processing made of it: applied, unchanged, ignored, not_a_tally_payment.
    outcome         text        CHECK (outcome ~ '^[a-z_]{1,32}$'),
    PRIMARY KEY (merchant_id, notification_id),
    CONSTRAINT webhook_notifications_processed_whole CHECK ((processed_at IS NULL) = (outcome IS NULL))
);
