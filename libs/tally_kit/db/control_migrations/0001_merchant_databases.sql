-- Where each merchant's database lives. A row is written as `provisioning` before the
-- database is created and becomes `ready` once it is migrated, so a provisioning cut
-- short by a crash is found and finished by the next attempt.
CREATE TABLE merchant_databases (
    merchant_id text        PRIMARY KEY CHECK (merchant_id ~ '^[a-z][a-z0-9-]{2,31}$'),
    -- "host:port" of the PostgreSQL server holding the database.
    server      text        NOT NULL,
    database    text        NOT NULL UNIQUE,
    status      text        NOT NULL CHECK (status IN ('provisioning', 'ready')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
