//! The `statements` read model: per-account entries with a running balance,
//! and the `transfers` table that shows one movement to either party.

use chrono::{DateTime, Utc};
use ledger_commands::store::RecordedEvent;
use ledger_domain::Event;
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

pub const TABLES: &[&str] = &["statement_entries", "transfers"];

pub async fn apply(conn: &mut PgConnection, recorded: &RecordedEvent, event: &Event) -> Result<(), sqlx::Error> {
    let Event::TransferRecorded(t) = event else {
        return Ok(());
    };
    let inserted = sqlx::query(
        "INSERT INTO transfers (transfer_id, from_account, to_account, amount, currency, kind, reference,
                                recorded_at, position)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (transfer_id) DO NOTHING",
    )
    .bind(t.transfer_id)
    .bind(t.from_account)
    .bind(t.to_account)
    .bind(t.amount)
    .bind(&t.currency)
    .bind(t.kind.as_str())
    .bind(&t.reference)
    .bind(recorded.metadata.recorded_at)
    .bind(recorded.position)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(());
    }
    for (account, counterparty, direction, delta) in
        [(t.from_account, t.to_account, "debit", -t.amount), (t.to_account, t.from_account, "credit", t.amount)]
    {
        // The next entry continues the account's previous one in apply order.
        sqlx::query(
            "INSERT INTO statement_entries (account_id, entry_no, position, transfer_id, direction, amount,
                                            balance_after, counterparty_account, kind, reference, recorded_at)
             SELECT $1, COALESCE(last.entry_no, 0) + 1, $2, $3, $4, $5,
                    COALESCE(last.balance_after, 0) + $6, $7, $8, $9, $10
             FROM (SELECT 1) one
             LEFT JOIN LATERAL (
                 SELECT entry_no, balance_after FROM statement_entries
                 WHERE account_id = $1 ORDER BY entry_no DESC LIMIT 1
             ) last ON true",
        )
        .bind(account)
        .bind(recorded.position)
        .bind(t.transfer_id)
        .bind(direction)
        .bind(t.amount)
        .bind(delta)
        .bind(counterparty)
        .bind(t.kind.as_str())
        .bind(&t.reference)
        .bind(recorded.metadata.recorded_at)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct EntryView {
    pub entry_no: i64,
    pub transfer_id: Uuid,
    pub direction: String,
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub counterparty_account: Uuid,
    pub kind: String,
    pub reference: Option<String>,
    pub recorded_at: DateTime<Utc>,
    pub position: i64,
}

/// Entries newest first; `before` is the cursor (an entry number) from the previous page.
pub async fn entries(
    pool: &PgPool,
    account_id: Uuid,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<EntryView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT entry_no, transfer_id, direction, amount, balance_after, counterparty_account, kind,
                reference, recorded_at, position
         FROM statement_entries
         WHERE account_id = $1 AND entry_no < COALESCE($2, 9223372036854775807)
         ORDER BY entry_no DESC LIMIT $3",
    )
    .bind(account_id)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct TransferView {
    pub transfer_id: Uuid,
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: Decimal,
    pub currency: String,
    pub kind: String,
    pub reference: Option<String>,
    pub recorded_at: DateTime<Utc>,
    pub position: i64,
    pub from_owner: Option<Uuid>,
    pub to_owner: Option<Uuid>,
}

pub async fn transfer(pool: &PgPool, transfer_id: Uuid) -> Result<Option<TransferView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT t.transfer_id, t.from_account, t.to_account, t.amount, t.currency, t.kind, t.reference,
                t.recorded_at, t.position, f.owner_id AS from_owner, o.owner_id AS to_owner
         FROM transfers t
         LEFT JOIN balances f ON f.account_id = t.from_account
         LEFT JOIN balances o ON o.account_id = t.to_account
         WHERE t.transfer_id = $1",
    )
    .bind(transfer_id)
    .fetch_optional(pool)
    .await
}
