-- AIP-155 idempotency keys: a mutating request's `request_id`, written in the same
-- transaction as the request's effect, with the response it produced.
CREATE TABLE idempotency_keys (
    request_id  text        PRIMARY KEY,
    operation   text        NOT NULL,
    -- sha256 over the operation and the request without its request_id.
    fingerprint text        NOT NULL,
    -- The serialized response; NULL only inside the transaction that reserved the key,
    -- between reserving it and storing the response.
    response    bytea,
    created_at  timestamptz NOT NULL DEFAULT now()
);
