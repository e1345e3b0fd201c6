-- Housekeeping deletes inbox rows and idempotency keys past their retention oldest first
-- (tally_kit.housekeeping); these indexes find them without reading the whole table. The
-- outbox needs none: its ids grow with time, so its oldest published rows come first by id.
CREATE INDEX inbox_handled_at_idx ON inbox (handled_at);
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);
