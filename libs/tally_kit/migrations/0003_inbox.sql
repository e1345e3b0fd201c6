-- Inbox: ids of the events a consumer has applied, recorded in the same transaction as
-- their effect, so a redelivered event is acknowledged without being applied again.
CREATE TABLE inbox (
    event_id    uuid        PRIMARY KEY,
    merchant_id text        NOT NULL,
    consumer    text        NOT NULL,
    event_type  text        NOT NULL,
    handled_at  timestamptz NOT NULL DEFAULT now()
);
