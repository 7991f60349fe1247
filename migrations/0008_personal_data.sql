-- Crypto-shredding: each user's personal fields in events are sealed with a
-- key of their own, kept here (itself sealed with LEDGER_SECRET_KEY) and
-- never in the log. Forgetting a user deletes the key.
CREATE TABLE personal_data_keys (
    user_id     uuid PRIMARY KEY,
    key_sealed  bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Who was forgotten: their clear personal fields from before sealing
-- (UserRegistered v1, LoginFailed v1) are masked on the way out too.
CREATE TABLE forgotten_users (
    user_id       uuid PRIMARY KEY,
    forgotten_at  timestamptz NOT NULL DEFAULT now()
);
