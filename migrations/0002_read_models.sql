-- The read side. Every table here is rebuilt from the log by `ledger replay`.

-- How far each projection has applied the log, in tailing order.
CREATE TABLE projection_checkpoints (
    projection      text PRIMARY KEY,
    transaction_id  xid8   NOT NULL,
    position        bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE balances (
    account_id     uuid PRIMARY KEY,
    owner_id       uuid,
    currency       text        NOT NULL,
    kind           text        NOT NULL,
    name           text,
    balance        numeric     NOT NULL,
    available      numeric     NOT NULL,
    version        bigint      NOT NULL,
    last_position  bigint      NOT NULL,
    opened_at      timestamptz NOT NULL
);
CREATE INDEX balances_owner ON balances (owner_id);

CREATE TABLE statement_entries (
    account_id            uuid        NOT NULL,
    -- 1, 2, 3 ... in the order the log was applied; the running balance follows it.
    entry_no              bigint      NOT NULL,
    position              bigint      NOT NULL,
    transfer_id           uuid        NOT NULL,
    direction             text        NOT NULL CHECK (direction IN ('debit', 'credit')),
    amount                numeric     NOT NULL,
    balance_after         numeric     NOT NULL,
    counterparty_account  uuid        NOT NULL,
    kind                  text        NOT NULL,
    reference             text,
    recorded_at           timestamptz NOT NULL,
    PRIMARY KEY (account_id, entry_no)
);

CREATE TABLE transfers (
    transfer_id   uuid PRIMARY KEY,
    from_account  uuid        NOT NULL,
    to_account    uuid        NOT NULL,
    amount        numeric     NOT NULL,
    currency      text        NOT NULL,
    kind          text        NOT NULL,
    reference     text,
    recorded_at   timestamptz NOT NULL,
    position      bigint      NOT NULL
);
