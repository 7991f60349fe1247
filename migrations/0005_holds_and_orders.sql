-- Finding a hold's account from its id, on the write side.
CREATE INDEX events_hold_placed ON events ((payload->>'hold_id')) WHERE event_type = 'HoldPlaced';

-- Read side: holds (part of the balances projection, so `available` and the
-- holds that explain it change in one transaction).
CREATE TABLE holds (
    hold_id          uuid PRIMARY KEY,
    from_account     uuid        NOT NULL,
    to_account       uuid        NOT NULL,
    amount           numeric     NOT NULL,
    captured_amount  numeric     NOT NULL DEFAULT 0,
    currency         text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('pending', 'captured', 'released', 'expired')),
    expires_at       timestamptz NOT NULL,
    reference        text,
    order_id         uuid,
    placed_at        timestamptz NOT NULL,
    resolved_at      timestamptz,
    position         bigint      NOT NULL
);
CREATE INDEX holds_account ON holds (from_account, status);
CREATE INDEX holds_to_account ON holds (to_account, status);
-- The expiry scheduler's work list.
CREATE INDEX holds_due ON holds (expires_at) WHERE status = 'pending';

-- Read side: orders and their status history (the `orders` projection).
CREATE TABLE orders (
    order_id          uuid PRIMARY KEY,
    customer_id       uuid        NOT NULL,
    account_id        uuid        NOT NULL,
    merchant_account  uuid        NOT NULL,
    merchant_owner    uuid,
    amount            numeric     NOT NULL,
    currency          text        NOT NULL,
    description       text        NOT NULL,
    status            text        NOT NULL,
    cancel_reason     text,
    hold_id           uuid,
    captured          numeric     NOT NULL DEFAULT 0,
    refunded          numeric     NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL,
    position          bigint      NOT NULL
);
CREATE INDEX orders_customer ON orders (customer_id, status);
CREATE INDEX orders_merchant ON orders (merchant_owner);

CREATE TABLE order_history (
    order_id     uuid        NOT NULL,
    position     bigint      NOT NULL,
    event_type   text        NOT NULL,
    status       text        NOT NULL,
    detail       jsonb       NOT NULL,
    recorded_at  timestamptz NOT NULL,
    PRIMARY KEY (order_id, position)
);
