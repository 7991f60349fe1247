//! The `balances` read model: one row per account with balance, available,
//! version (movements applied) and the last position that changed it.

use chrono::{DateTime, Utc};
use ledger_commands::store::RecordedEvent;
use ledger_domain::events::AccountKind;
use ledger_domain::Event;
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

pub const TABLES: &[&str] = &["balances"];

pub async fn apply(conn: &mut PgConnection, recorded: &RecordedEvent, event: &Event) -> Result<(), sqlx::Error> {
    match event {
        Event::AccountOpened(a) => {
            sqlx::query(
                "INSERT INTO balances (account_id, owner_id, currency, kind, name, balance, available,
                                       version, last_position, opened_at)
                 VALUES ($1, $2, $3, $4, $5, 0, 0, 0, $6, $7)
                 ON CONFLICT (account_id) DO NOTHING",
            )
            .bind(a.account_id)
            .bind(a.owner_id)
            .bind(&a.currency)
            .bind(match a.kind {
                AccountKind::User => "user",
                AccountKind::System => "system",
            })
            .bind(&a.name)
            .bind(recorded.position)
            .bind(recorded.metadata.recorded_at)
            .execute(&mut *conn)
            .await?;
        }
        Event::TransferRecorded(t) => {
            sqlx::query(
                "UPDATE balances SET balance = balance + d.delta, available = available + d.delta,
                        version = version + 1, last_position = $4
                 FROM (VALUES ($1::uuid, -$3::numeric), ($2::uuid, $3::numeric)) AS d(account_id, delta)
                 WHERE balances.account_id = d.account_id",
            )
            .bind(t.from_account)
            .bind(t.to_account)
            .bind(t.amount)
            .bind(recorded.position)
            .execute(&mut *conn)
            .await?;
        }
        Event::AccountFrozen(f) => set_frozen(conn, f.account_id, true, recorded.position).await?,
        Event::AccountUnfrozen(f) => set_frozen(conn, f.account_id, false, recorded.position).await?,
        _ => {}
    }
    Ok(())
}

async fn set_frozen(conn: &mut PgConnection, account_id: Uuid, frozen: bool, position: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE balances SET frozen = $2, last_position = $3 WHERE account_id = $1")
        .bind(account_id)
        .bind(frozen)
        .bind(position)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// One account as the query API shows it.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct AccountView {
    pub account_id: Uuid,
    pub owner_id: Option<Uuid>,
    pub currency: String,
    pub kind: String,
    pub name: Option<String>,
    pub balance: Decimal,
    pub available: Decimal,
    pub version: i64,
    pub last_position: i64,
    pub opened_at: DateTime<Utc>,
    pub frozen: bool,
}

const COLUMNS: &str =
    "account_id, owner_id, currency, kind, name, balance, available, version, last_position, opened_at, frozen";

pub async fn account(pool: &PgPool, account_id: Uuid) -> Result<Option<AccountView>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM balances WHERE account_id = $1"))
        .bind(account_id)
        .fetch_optional(pool)
        .await
}

pub async fn accounts_of(pool: &PgPool, owner_id: Uuid) -> Result<Vec<AccountView>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM balances WHERE owner_id = $1 ORDER BY opened_at, account_id"))
        .bind(owner_id)
        .fetch_all(pool)
        .await
}

/// Every row, in a stable order, for consistency checks and replay comparisons.
pub async fn all(conn: &mut PgConnection) -> Result<Vec<AccountView>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM balances ORDER BY account_id")).fetch_all(&mut *conn).await
}
