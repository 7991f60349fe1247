-- Identity and access. The event log stays the record of what happened
-- (every change below is written in the same transaction as its event); these
-- tables hold what must not be in the log (hashes, encrypted secrets) and what
-- every request must check quickly (role, block, session and key status).

-- Who did it from where, for the audit of identity events.
ALTER TABLE events ADD COLUMN client_ip text, ADD COLUMN user_agent text;

-- A write-side cache of the user stream's role and block, kept in the
-- registration row and changed only in the transaction that appends the event.
ALTER TABLE credentials
    ADD COLUMN role        text        NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'support', 'admin')),
    ADD COLUMN blocked     boolean     NOT NULL DEFAULT false,
    ADD COLUMN created_at  timestamptz NOT NULL DEFAULT now();
CREATE INDEX credentials_email_search ON credentials (email text_pattern_ops);

-- A login session: one family of rotating refresh tokens.
CREATE TABLE sessions (
    session_id      uuid PRIMARY KEY,
    user_id         uuid        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    user_agent      text,
    client_ip       text,
    revoked_at      timestamptz,
    revoked_reason  text
);
CREATE INDEX sessions_user ON sessions (user_id) WHERE revoked_at IS NULL;

-- Refresh tokens by SHA-256 of the token (256 random bits: no salt needed).
-- A token is used once: `used_at` is set when it is rotated; presenting a
-- used token again revokes its session.
CREATE TABLE refresh_tokens (
    token_hash  bytea PRIMARY KEY,
    session_id  uuid        NOT NULL REFERENCES sessions,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

-- TOTP secrets, encrypted with LEDGER_SECRET_KEY (XChaCha20-Poly1305).
CREATE TABLE two_factor (
    user_id           uuid PRIMARY KEY,
    secret_sealed     bytea       NOT NULL,
    enabled           boolean     NOT NULL DEFAULT false,
    -- The last TOTP time step accepted: a code works once within its window.
    last_step         bigint      NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE recovery_codes (
    user_id    uuid        NOT NULL,
    code_hash  bytea       NOT NULL,
    used_at    timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

CREATE TABLE api_keys (
    key_id        uuid PRIMARY KEY,
    user_id       uuid        NOT NULL,
    name          text        NOT NULL,
    scopes        text[]      NOT NULL,
    key_hash      bytea       NOT NULL UNIQUE,
    -- The first characters of the key, so its owner can tell keys apart.
    key_prefix    text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id);

-- Failed logins per subject ('email:...' or 'ip:...'), for the backoff.
CREATE TABLE login_throttle (
    subject          text PRIMARY KEY,
    failures         integer     NOT NULL,
    last_failure_at  timestamptz NOT NULL
);

-- The read side of `GET /v1/me/activity`: each user's security events.
CREATE TABLE security_activity (
    user_id      uuid        NOT NULL,
    position     bigint      NOT NULL,
    event_type   text        NOT NULL,
    detail       jsonb       NOT NULL,
    actor_id     uuid,
    client_ip    text,
    user_agent   text,
    recorded_at  timestamptz NOT NULL,
    PRIMARY KEY (user_id, position)
);
ALTER TABLE balances ADD COLUMN frozen boolean NOT NULL DEFAULT false;

-- The credit side of a movement loads only an account's opening and freezes.
CREATE INDEX events_account_status ON events (stream_id, stream_version)
    WHERE event_type IN ('AccountOpened', 'AccountFrozen', 'AccountUnfrozen');
