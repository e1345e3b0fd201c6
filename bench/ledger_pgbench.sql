-- One two-phase operation as the ledger sends it to PostgreSQL: OpenOperation's transaction,
-- then RecordAndCloseOperation's, statement for statement and in the same order, with values
-- of the same types and sizes (captured from the running service with asyncpg's query logger;
-- the last statement of each is the unit of work's: the request's key with its response, and
-- the events published).
-- Run by bench/ledger_bench.py (`--phases pgbench`) with `--protocol=prepared`, as asyncpg
-- prepares every statement; keep it in step with tally_kit.uow/idempotency/outbox and
-- tally_ledger.store when they change.
--
-- Not in it: the outbox relay's claim-and-mark transaction, which the service runs once per
-- batch of events rather than per operation.
--
-- Variables: :merchant and :users_per_client (--define), :client_id (pgbench's own). Each
-- client works on users of its own, one picked at random per operation, so no client is
-- refused for an operation another has open.
\set user_number :client_id * :users_per_client + random(0, :users_per_client - 1)
\set open_key random(1, 9000000000000000000)
\set close_key random(1, 9000000000000000000)

-- OpenOperation
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT merchant_id, user_id, balance, debt, registered_at FROM accounts
 WHERE merchant_id = :merchant::text AND user_id = 'user-' || lpad(:user_number::text, 6, '0')
   FOR UPDATE;
INSERT INTO operations (merchant_id, operation_id, user_id, operation_code, operation_version,
                        resource_unit, credits_per_unit, workflow_id, state, opened_at)
VALUES (:merchant::text, gen_random_uuid(), 'user-' || lpad(:user_number::text, 6, '0'), 'bench.tokens', 1,
        'token', 0.5, NULL, 'open', now())
ON CONFLICT (merchant_id, user_id) WHERE state = 'open' DO NOTHING
RETURNING operation_id \gset
WITH recorded AS (
    INSERT INTO idempotency_keys (request_id, operation, fingerprint, response)
    VALUES ('pgbench-' || :open_key::text, '/tally.ledger.v1.LedgerService/OpenOperation',
            md5(:open_key::text) || md5(:user_number::text), decode(repeat('0a', 97), 'hex'))
    ON CONFLICT (request_id) DO NOTHING
    RETURNING true
), published AS (
    INSERT INTO outbox (event_id, event_type, merchant_id, envelope)
    SELECT e.event_id, e.event_type, :merchant::text, e.envelope
      FROM unnest(ARRAY[]::uuid[], ARRAY[]::text[], ARRAY[]::bytea[])
           WITH ORDINALITY AS e(event_id, event_type, envelope, position)
     ORDER BY e.position
)
SELECT EXISTS (SELECT FROM recorded);
COMMIT;

-- RecordAndCloseOperation
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT a.merchant_id AS a_merchant_id, a.user_id AS a_user_id, a.balance AS a_balance, a.debt AS a_debt,
       a.registered_at AS a_registered_at,
       a.xmin = (SELECT s.xmin FROM accounts s WHERE s.merchant_id = a.merchant_id AND s.user_id = a.user_id)
           AS as_read,
       o.merchant_id AS o_merchant_id, o.operation_id AS o_operation_id, o.user_id AS o_user_id,
       o.operation_code AS o_operation_code, o.operation_version AS o_operation_version,
       o.resource_unit AS o_resource_unit, o.credits_per_unit AS o_credits_per_unit,
       o.workflow_id AS o_workflow_id, o.state AS o_state, o.opened_at AS o_opened_at,
       o.closed_at AS o_closed_at, o.resource_amount AS o_resource_amount, o.credits AS o_credits,
       l.merchant_id, l.lot_id, l.user_id, l.source, l.credits, l.remaining, l.consumed, l.issued_at,
       l.expires_at, l.reference, l.product_id, l.order_id, l.paid_amount_minor, l.paid_currency,
       l.provider_reference, l.payment_id, l.reversal, l.reversed_at
  FROM operations o
  JOIN accounts a ON a.merchant_id = o.merchant_id AND a.user_id = o.user_id
  LEFT JOIN lots l ON l.merchant_id = o.merchant_id AND l.user_id = o.user_id AND l.remaining > 0
 WHERE o.merchant_id = :merchant::text AND o.operation_id = :operation_id::uuid
 ORDER BY l.expires_at ASC NULLS LAST, l.issued_at, l.lot_id
   FOR UPDATE OF a \gset
INSERT INTO entries (merchant_id, user_id, entry_id, kind, amount, lot_id, occurred_at, reference,
                     operation_id, operation_code, operation_version, resource_amount, resource_unit,
                     credits_per_unit, workflow_id, revoked_lot_id, reason, actor)
SELECT :merchant::text, :user_id::text, e.entry_id, e.kind, e.amount, e.lot_id, e.occurred_at, e.reference,
       e.operation_id, e.operation_code, e.operation_version, e.resource_amount, e.resource_unit,
       e.credits_per_unit, e.workflow_id, e.revoked_lot_id, e.reason, e.actor
  FROM unnest(ARRAY[gen_random_uuid()], ARRAY['debit'], ARRAY[-5.000000]::numeric[], ARRAY[:lot_id::uuid],
              ARRAY[now()], ARRAY['operation:' || :operation_id::text], ARRAY[:operation_id::uuid],
              ARRAY['bench.tokens'], ARRAY[1], ARRAY[10]::numeric[], ARRAY['token'], ARRAY[0.5]::numeric[],
              ARRAY[NULL]::text[], ARRAY[NULL]::uuid[], ARRAY[NULL]::text[], ARRAY[NULL]::text[])
       WITH ORDINALITY AS e(entry_id, kind, amount, lot_id, occurred_at, reference,
                            operation_id, operation_code, operation_version, resource_amount, resource_unit,
                            credits_per_unit, workflow_id, revoked_lot_id, reason, actor, position)
 ORDER BY e.position;
WITH ended AS (
    UPDATE operations SET state = 'closed', closed_at = now(), resource_amount = 10, credits = 5
     WHERE merchant_id = :merchant::text AND operation_id = :operation_id::uuid AND state = 'open'
    RETURNING operation_id
)
SELECT NULL::uuid AS lot_id, balance AS first, debt AS second, (SELECT count(*) FROM ended) AS ended
  FROM accounts WHERE merchant_id = :merchant::text AND user_id = :user_id::text
UNION ALL
SELECT lot_id, remaining, consumed, NULL
  FROM lots WHERE merchant_id = :merchant::text AND lot_id = ANY(ARRAY[:lot_id::uuid]);
WITH recorded AS (
    INSERT INTO idempotency_keys (request_id, operation, fingerprint, response)
    VALUES ('pgbench-' || :close_key::text, '/tally.ledger.v1.LedgerService/RecordAndCloseOperation',
            md5(:close_key::text) || md5(:user_number::text), decode(repeat('0a', 393), 'hex'))
    ON CONFLICT (request_id) DO NOTHING
    RETURNING true
), published AS (
    INSERT INTO outbox (event_id, event_type, merchant_id, envelope)
    SELECT e.event_id, e.event_type, :merchant::text, e.envelope
      FROM unnest(ARRAY[gen_random_uuid()], ARRAY['ledger.operation_closed'], ARRAY[decode(repeat('0a', 582), 'hex')])
           WITH ORDINALITY AS e(event_id, event_type, envelope, position)
     ORDER BY e.position
)
SELECT EXISTS (SELECT FROM recorded);
COMMIT;
