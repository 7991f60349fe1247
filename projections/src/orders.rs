//! The `orders` read model: each order's current state and its status history.

use chrono::{DateTime, Utc};
use ledger_commands::store::RecordedEvent;
use ledger_domain::Event;
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

pub const TABLES: &[&str] = &["orders", "order_history"];

pub async fn apply(conn: &mut PgConnection, recorded: &RecordedEvent, event: &Event) -> Result<(), sqlx::Error> {
    let order_id = match event {
        Event::OrderPlaced(o) => {
            // The merchant account's owner, from the log itself: this projection
            // must not depend on how far another one has got.
            let owner: Option<String> = sqlx::query_scalar(
                "SELECT payload->>'owner_id' FROM events WHERE stream_id = $1 AND stream_version = 1",
            )
            .bind(format!("account-{}", o.merchant_account))
            .fetch_optional(&mut *conn)
            .await?
            .flatten();
            sqlx::query(
                "INSERT INTO orders (order_id, customer_id, account_id, merchant_account, merchant_owner, amount, currency,
                                     description, status, created_at, position)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'NEW', $9, $10) ON CONFLICT DO NOTHING",
            )
            .bind(o.order_id)
            .bind(o.customer_id)
            .bind(o.account_id)
            .bind(o.merchant_account)
            .bind(owner.and_then(|s| Uuid::parse_str(&s).ok()))
            .bind(o.amount)
            .bind(&o.currency)
            .bind(&o.description)
            .bind(recorded.metadata.recorded_at)
            .bind(recorded.position)
            .execute(&mut *conn)
            .await?;
            o.order_id
        }
        Event::OrderPaymentHeld(o) => {
            sqlx::query("UPDATE orders SET hold_id = $2, position = $3 WHERE order_id = $1")
                .bind(o.order_id)
                .bind(o.hold_id)
                .bind(recorded.position)
                .execute(&mut *conn)
                .await?;
            o.order_id
        }
        Event::OrderFinished(o) => {
            sqlx::query("UPDATE orders SET status = 'FINISHED', captured = $2, position = $3 WHERE order_id = $1")
                .bind(o.order_id)
                .bind(o.amount)
                .bind(recorded.position)
                .execute(&mut *conn)
                .await?;
            o.order_id
        }
        Event::OrderCancelled(o) => {
            let reason = serde_json::to_value(o.reason).ok().and_then(|v| v.as_str().map(str::to_owned));
            sqlx::query(
                "UPDATE orders SET status = 'CANCELLED', cancel_reason = $2, position = $3 WHERE order_id = $1",
            )
            .bind(o.order_id)
            .bind(reason)
            .bind(recorded.position)
            .execute(&mut *conn)
            .await?;
            o.order_id
        }
        Event::OrderRefunded(o) => {
            sqlx::query("UPDATE orders SET refunded = refunded + $2, position = $3 WHERE order_id = $1")
                .bind(o.order_id)
                .bind(o.amount)
                .bind(recorded.position)
                .execute(&mut *conn)
                .await?;
            o.order_id
        }
        _ => return Ok(()),
    };
    // The detail is the payload without the order's id (the row has it).
    sqlx::query(
        "INSERT INTO order_history (order_id, position, event_type, status, detail, recorded_at)
         SELECT $1, $2, $3, status, $4::jsonb - 'order_id', $5 FROM orders WHERE order_id = $1 ON CONFLICT DO NOTHING",
    )
    .bind(order_id)
    .bind(recorded.position)
    .bind(&recorded.event_type)
    .bind(recorded.payload.as_json())
    .bind(recorded.metadata.recorded_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct OrderView {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub account_id: Uuid,
    pub merchant_account: Uuid,
    pub merchant_owner: Option<Uuid>,
    pub amount: Decimal,
    pub currency: String,
    pub description: String,
    pub status: String,
    pub cancel_reason: Option<String>,
    pub hold_id: Option<Uuid>,
    pub captured: Decimal,
    pub refunded: Decimal,
    pub created_at: DateTime<Utc>,
    pub position: i64,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct HistoryView {
    pub position: i64,
    pub event_type: String,
    pub status: String,
    pub detail: Value,
    pub recorded_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "order_id, customer_id, account_id, merchant_account, merchant_owner, amount, currency, description,
     status, cancel_reason, hold_id, captured, refunded, created_at, position";

pub async fn order(pool: &PgPool, order_id: Uuid) -> Result<Option<OrderView>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM orders WHERE order_id = $1"))
        .bind(order_id)
        .fetch_optional(pool)
        .await
}

/// A user's orders as customer (or, `as_merchant`, as the shop's owner),
/// newest first, optionally of one status.
pub async fn orders_of(
    pool: &PgPool,
    user_id: Uuid,
    as_merchant: bool,
    status: Option<&str>,
) -> Result<Vec<OrderView>, sqlx::Error> {
    let whose = if as_merchant { "merchant_owner" } else { "customer_id" };
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM orders WHERE {whose} = $1 AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC LIMIT 500"
    ))
    .bind(user_id)
    .bind(status)
    .fetch_all(pool)
    .await
}

pub async fn history(pool: &PgPool, order_id: Uuid) -> Result<Vec<HistoryView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT position, event_type, status, detail, recorded_at FROM order_history WHERE order_id = $1 ORDER BY position",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await
}
