-- The write side: one append-only log of events.
CREATE TABLE events (
    -- Global position. Identity values can commit out of order; readers that
    -- tail the log use (transaction_id, position), see ARCHITECTURE.md.
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version > 0),
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL CHECK (schema_version > 0),
    payload         jsonb       NOT NULL,
    command_id      uuid,
    correlation_id  uuid,
    causation_id    uuid,
    actor_id        uuid,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    -- Optimistic concurrency: two writers deciding on the same stream version collide here.
    UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_tailing ON events (transaction_id, position);
-- A user account's credits are recorded in other streams; its state needs them.
CREATE INDEX events_transfer_to ON events ((payload->>'to_account')) WHERE event_type = 'TransferRecorded';
CREATE INDEX events_transfer_from ON events ((payload->>'from_account')) WHERE event_type = 'TransferRecorded';

CREATE FUNCTION events_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER events_append_only_rows
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_append_only();

CREATE TRIGGER events_append_only_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_append_only();

-- Idempotency: one row per (user, Idempotency-Key), written in the same
-- transaction as the command's events, kept forever.
CREATE TABLE commands (
    user_id          uuid        NOT NULL,
    idempotency_key  text        NOT NULL,
    command_id       uuid        NOT NULL UNIQUE,
    request_hash     bytea       NOT NULL,
    status           smallint    NOT NULL,
    response         jsonb       NOT NULL,
    position         bigint,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key)
);

-- Credentials never enter the log; they are written in the registration's transaction.
CREATE TABLE credentials (
    user_id        uuid PRIMARY KEY,
    email          text NOT NULL UNIQUE,
    password_hash  text NOT NULL
);

-- How far the relay has published the log to JetStream, per stream name.
CREATE TABLE relay_checkpoints (
    stream          text PRIMARY KEY,
    transaction_id  xid8   NOT NULL,
    position        bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
