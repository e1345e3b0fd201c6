-- Receipts and credit notes of one merchant (each merchant has a database of its own). Every
-- row still carries merchant_id and every query filters on it. The database enforces every
-- rule it can on its own, so that a bug above it cannot store what the domain forbids:
--
-- * numbers are gapless: a series counter grows by exactly 1 per update, and at commit the
--   document carrying the counter's value must exist in the same transaction (a deferred
--   constraint trigger); a document must carry the value its transaction just allocated;
--   no sequence object is involved, since sequences skip values on rollback;
-- * one receipt per order, one credit note per refund, one document per number;
-- * net + tax = gross on every line and document, and amounts are never negative;
-- * the credit notes of a receipt never credit more than its gross total;
-- * documents are immutable: UPDATE, DELETE and TRUNCATE are refused.
--
-- Issuing a document: allocate its number (upsert of the counter row, which locks it until
-- commit), then insert the document with that number, in one transaction.

-- The last number issued per kind of document, series and year. The row lock taken by
-- the allocating upsert serialises issuers of one series until they commit or roll back.
CREATE TABLE document_series (
    merchant_id    text        NOT NULL CHECK (merchant_id ~ '^[a-z][a-z0-9-]{2,31}$'),
    kind           text        NOT NULL CHECK (kind IN ('receipt', 'credit_note')),
    series         text        NOT NULL CHECK (series ~ '^[A-Z0-9][A-Z0-9-]{0,15}$'),
    year           integer     NOT NULL CHECK (year BETWEEN 1970 AND 9999),
    last_sequence  bigint      NOT NULL CHECK (last_sequence >= 1),
    -- When the document numbered `last_sequence` was issued: issue times never go back
    -- within a series, even across replicas whose clocks differ slightly.
    last_issued_at timestamptz NOT NULL,
    PRIMARY KEY (merchant_id, kind, series, year)
);

CREATE FUNCTION document_series_guard() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'document series are never deleted (% % %)', OLD.kind, OLD.series, OLD.year
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.last_sequence <> 1 THEN
            RAISE EXCEPTION 'a series starts at 1 (% % %)', NEW.kind, NEW.series, NEW.year
                USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF (NEW.merchant_id, NEW.kind, NEW.series, NEW.year) IS DISTINCT FROM
       (OLD.merchant_id, OLD.kind, OLD.series, OLD.year)
       OR NEW.last_sequence <> OLD.last_sequence + 1
       OR NEW.last_issued_at < OLD.last_issued_at
    THEN
        RAISE EXCEPTION 'a series only grows by 1, forward in time (% % %)', OLD.kind, OLD.series, OLD.year
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER document_series_guard
    BEFORE INSERT OR UPDATE OR DELETE ON document_series
    FOR EACH ROW EXECUTE FUNCTION document_series_guard();

-- `<series>-<year>-<mark><sequence>`, the sequence zero-padded to at least 6 digits (the
-- domain's DocumentNumber.text); mark is '' for receipts and 'CN' for credit notes.
CREATE FUNCTION receipt_document_number(series text, year integer, sequence bigint, mark text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT series || '-' || lpad(year::text, 4, '0') || '-' || mark
           || lpad(sequence::text, greatest(6, length(sequence::text)), '0')
$$;

CREATE TABLE receipts (
    merchant_id              text          NOT NULL CHECK (merchant_id ~ '^[a-z][a-z0-9-]{2,31}$'),
    receipt_id               uuid          NOT NULL,
    user_id                  text          NOT NULL CHECK (user_id ~ '^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$'),
    order_id                 text          NOT NULL CHECK (order_id ~ '^[\x21-\x7e]{1,128}$'),
    series                   text          NOT NULL,
    year                     integer       NOT NULL,
    sequence                 bigint        NOT NULL CHECK (sequence >= 1),
    number                   text          NOT NULL,
    issued_at                timestamptz   NOT NULL,
    settled_at               timestamptz   NOT NULL,
    currency                 text          NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- The sums of the lines.
    net_minor                bigint        NOT NULL CHECK (net_minor >= 0),
    tax_minor                bigint        NOT NULL CHECK (tax_minor >= 0),
    gross_minor              bigint        NOT NULL CHECK (gross_minor > 0),
    -- The merchant's legal details and tax regime when the receipt was issued.
    legal_name               text          NOT NULL CHECK (length(btrim(legal_name)) BETWEEN 1 AND 200),
    tax_id                   text          NOT NULL CHECK (length(btrim(tax_id)) BETWEEN 1 AND 64),
    address_lines            text[]        NOT NULL CHECK (cardinality(address_lines) BETWEEN 1 AND 4),
    locality                 text          NOT NULL,
    administrative_area      text          NOT NULL,
    postal_code              text          NOT NULL,
    region_code              text          NOT NULL CHECK (region_code ~ '^[A-Z]{2}$'),
    merchant_config_revision bigint        NOT NULL CHECK (merchant_config_revision >= 1),
    tax_rate_percent         numeric(7, 4) NOT NULL CHECK (tax_rate_percent BETWEEN 0 AND 100),
    prices_include_tax       boolean       NOT NULL,
    payment_id               text          NOT NULL CHECK (length(payment_id) <= 128),
    provider_reference       text          NOT NULL CHECK (length(provider_reference) <= 200),
    lot_id                   uuid          NOT NULL,
    PRIMARY KEY (merchant_id, receipt_id),
    CONSTRAINT receipts_amounts_add_up CHECK (net_minor + tax_minor = gross_minor),
    CONSTRAINT receipts_one_per_order UNIQUE (merchant_id, order_id),
    CONSTRAINT receipts_one_per_number UNIQUE (merchant_id, series, year, sequence),
    CONSTRAINT receipts_number_text CHECK (number = receipt_document_number(series, year, sequence, '')),
    CONSTRAINT receipts_year_of_issue CHECK (year = extract(year FROM issued_at AT TIME ZONE 'UTC'))
);

CREATE INDEX receipts_by_user ON receipts (merchant_id, user_id, issued_at DESC, receipt_id DESC);

CREATE TABLE receipt_lines (
    merchant_id  text    NOT NULL,
    receipt_id   uuid    NOT NULL,
    position     integer NOT NULL CHECK (position >= 1),
    description  text    NOT NULL CHECK (length(btrim(description)) BETWEEN 1 AND 200),
    product_id   uuid    NOT NULL,
    net_minor    bigint  NOT NULL CHECK (net_minor >= 0),
    tax_minor    bigint  NOT NULL CHECK (tax_minor >= 0),
    gross_minor  bigint  NOT NULL CHECK (gross_minor >= 0),
    PRIMARY KEY (merchant_id, receipt_id, position),
    FOREIGN KEY (merchant_id, receipt_id) REFERENCES receipts (merchant_id, receipt_id),
    CONSTRAINT receipt_lines_amounts_add_up CHECK (net_minor + tax_minor = gross_minor)
);

CREATE TABLE credit_notes (
    merchant_id              text          NOT NULL CHECK (merchant_id ~ '^[a-z][a-z0-9-]{2,31}$'),
    credit_note_id           uuid          NOT NULL,
    receipt_id               uuid          NOT NULL,
    refund_reference         text          NOT NULL CHECK (length(refund_reference) BETWEEN 1 AND 200),
    series                   text          NOT NULL,
    year                     integer       NOT NULL,
    sequence                 bigint        NOT NULL CHECK (sequence >= 1),
    number                   text          NOT NULL,
    issued_at                timestamptz   NOT NULL,
    description              text          NOT NULL CHECK (length(btrim(description)) >= 1),
    currency                 text          NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    net_minor                bigint        NOT NULL CHECK (net_minor >= 0),
    tax_minor                bigint        NOT NULL CHECK (tax_minor >= 0),
    gross_minor              bigint        NOT NULL CHECK (gross_minor > 0),
    -- The merchant's legal details when the credit note was issued; its tax regime is the
    -- receipt's.
    legal_name               text          NOT NULL CHECK (length(btrim(legal_name)) BETWEEN 1 AND 200),
    tax_id                   text          NOT NULL CHECK (length(btrim(tax_id)) BETWEEN 1 AND 64),
    address_lines            text[]        NOT NULL CHECK (cardinality(address_lines) BETWEEN 1 AND 4),
    locality                 text          NOT NULL,
    administrative_area      text          NOT NULL,
    postal_code              text          NOT NULL,
    region_code              text          NOT NULL CHECK (region_code ~ '^[A-Z]{2}$'),
    merchant_config_revision bigint        NOT NULL CHECK (merchant_config_revision >= 1),
    PRIMARY KEY (merchant_id, credit_note_id),
    FOREIGN KEY (merchant_id, receipt_id) REFERENCES receipts (merchant_id, receipt_id),
    CONSTRAINT credit_notes_amounts_add_up CHECK (net_minor + tax_minor = gross_minor),
    CONSTRAINT credit_notes_one_per_refund UNIQUE (merchant_id, refund_reference),
    CONSTRAINT credit_notes_one_per_number UNIQUE (merchant_id, series, year, sequence),
    CONSTRAINT credit_notes_number_text CHECK (number = receipt_document_number(series, year, sequence, 'CN')),
    CONSTRAINT credit_notes_year_of_issue CHECK (year = extract(year FROM issued_at AT TIME ZONE 'UTC'))
);

CREATE INDEX credit_notes_by_receipt ON credit_notes (merchant_id, receipt_id, issued_at, sequence);

-- Documents are immutable.
CREATE FUNCTION documents_immutable() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION '% rows are never changed or removed', TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER receipts_immutable BEFORE UPDATE OR DELETE ON receipts
    FOR EACH ROW EXECUTE FUNCTION documents_immutable();
CREATE TRIGGER receipts_no_truncate BEFORE TRUNCATE ON receipts
    FOR EACH STATEMENT EXECUTE FUNCTION documents_immutable();
CREATE TRIGGER receipt_lines_immutable BEFORE UPDATE OR DELETE ON receipt_lines
    FOR EACH ROW EXECUTE FUNCTION documents_immutable();
CREATE TRIGGER receipt_lines_no_truncate BEFORE TRUNCATE ON receipt_lines
    FOR EACH STATEMENT EXECUTE FUNCTION documents_immutable();
CREATE TRIGGER credit_notes_immutable BEFORE UPDATE OR DELETE ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION documents_immutable();
CREATE TRIGGER credit_notes_no_truncate BEFORE TRUNCATE ON credit_notes
    FOR EACH STATEMENT EXECUTE FUNCTION documents_immutable();
CREATE TRIGGER document_series_no_truncate BEFORE TRUNCATE ON document_series
    FOR EACH STATEMENT EXECUTE FUNCTION documents_immutable();

-- A document takes the number its transaction just allocated: the counter row is locked by
-- that transaction, so its value is this transaction's latest allocation.
CREATE FUNCTION documents_take_allocated_number() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    document_kind text := CASE TG_TABLE_NAME WHEN 'receipts' THEN 'receipt' ELSE 'credit_note' END;
    allocated bigint;
BEGIN
    SELECT last_sequence INTO allocated FROM document_series
     WHERE merchant_id = NEW.merchant_id AND kind = document_kind
       AND series = NEW.series AND year = NEW.year;
    IF allocated IS DISTINCT FROM NEW.sequence THEN
        RAISE EXCEPTION '% % must carry the number just allocated in its series (% rather than %)',
            document_kind, NEW.number, allocated, NEW.sequence
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER receipts_take_allocated_number BEFORE INSERT ON receipts
    FOR EACH ROW EXECUTE FUNCTION documents_take_allocated_number();
CREATE TRIGGER credit_notes_take_allocated_number BEFORE INSERT ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION documents_take_allocated_number();

-- At commit, every number allocated in the transaction belongs to a document: a transaction
-- that allocates a number must issue its document or roll back, so no number is skipped.
CREATE FUNCTION document_series_numbers_used() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    used boolean;
BEGIN
    IF NEW.kind = 'receipt' THEN
        SELECT EXISTS (
            SELECT 1 FROM receipts
             WHERE merchant_id = NEW.merchant_id AND series = NEW.series AND year = NEW.year
               AND sequence = NEW.last_sequence
        ) INTO used;
    ELSE
        SELECT EXISTS (
            SELECT 1 FROM credit_notes
             WHERE merchant_id = NEW.merchant_id AND series = NEW.series AND year = NEW.year
               AND sequence = NEW.last_sequence
        ) INTO used;
    END IF;
    IF NOT used THEN
        RAISE EXCEPTION 'number % of % series % %-% was allocated but no document carries it',
            NEW.last_sequence, NEW.kind, NEW.series, NEW.year, NEW.last_sequence
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER document_series_numbers_used
    AFTER INSERT OR UPDATE ON document_series
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION document_series_numbers_used();

-- The credit notes of a receipt never credit more than it, in its currency, for its order.
-- The issuer locks the receipt row first, so concurrent refunds of one receipt are counted
-- one after the other.
CREATE FUNCTION credit_notes_within_receipt() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    receipt receipts%ROWTYPE;
    credited bigint;
BEGIN
    SELECT * INTO receipt FROM receipts
     WHERE merchant_id = NEW.merchant_id AND receipt_id = NEW.receipt_id;
    IF NEW.currency <> receipt.currency THEN
        RAISE EXCEPTION 'credit note % is in %, its receipt % in %', NEW.number, NEW.currency,
            receipt.number, receipt.currency
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT coalesce(sum(gross_minor), 0) INTO credited FROM credit_notes
     WHERE merchant_id = NEW.merchant_id AND receipt_id = NEW.receipt_id;
    IF credited + NEW.gross_minor > receipt.gross_minor THEN
        RAISE EXCEPTION 'credit note % would credit % of receipt %, whose total is %', NEW.number,
            credited + NEW.gross_minor, receipt.number, receipt.gross_minor
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER credit_notes_within_receipt BEFORE INSERT ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION credit_notes_within_receipt();
