-- Transactional outbox: events written in the same transaction as the state change they
-- announce; the relay publishes them and then sets published_at.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    event_type   text        NOT NULL,
    merchant_id  text        NOT NULL,
    -- The serialized tally.common.v1.EventEnvelope, published as is.
    envelope     bytea       NOT NULL,
    -- clock_timestamp(), not now(): the insert time, close to the commit, so that the
    -- commit-to-publish lag does not include the rest of a long transaction.
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz
);

-- The relay claims unpublished rows in id order; this index holds only those.
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
