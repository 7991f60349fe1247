-- The durable writes of one POST /v1/transfers, one transfer per transaction:
-- the idempotency row and the TransferRecorded event, into the same tables
-- with the same indexes, constraints and triggers as the ledger's.
BEGIN;
INSERT INTO commands (user_id, idempotency_key, command_id, request_hash, status, response, position)
VALUES (gen_random_uuid(), 'pgbench-' || gen_random_uuid(), gen_random_uuid(),
        sha256(gen_random_uuid()::text::bytea), 201,
        jsonb_build_object('transfer_id', gen_random_uuid(), 'position', 1), 1);
INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload,
                    command_id, correlation_id, actor_id, recorded_at, mac)
VALUES (gen_random_uuid(), 'account-' || gen_random_uuid(), 1, 'TransferRecorded', 2,
        jsonb_build_object('transfer_id', gen_random_uuid(), 'from_account', gen_random_uuid(),
                           'to_account', gen_random_uuid(), 'amount', '0.01', 'currency', 'EUR',
                           'kind', 'transfer', 'initiated_by', gen_random_uuid(), 'reference', null),
        gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), now(),
        encode(sha256(gen_random_uuid()::text::bytea), 'hex'));
COMMIT;
